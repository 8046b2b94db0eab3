"""A SuperExec for a site that starts each ClientApp by forking a warm process.

Flower's SuperNode runs every message (train, evaluate, each SecAgg+ stage) in
a fresh ``flwr-clientapp`` process, which pays for a new interpreter and for
importing torch each time: most of a round's wall time on a small model. With
``flower-supernode --isolation process``, Flower lets the operator run the
SuperExec; this one imports torch and fedge once, then forks a child per task
that runs Flower's own ``run_clientapp`` (same Runtime API, same token, same
isolation from the SuperNode; only the start-up is shared). The Flower internals
this needs are in ``fedge.shared.ml.flower_compat``, checked before use.

Data: a forked task that loads the site's data tells this process (over a
pipe) which run config and data it used; this process then loads the same data
into its own per-process cache (``fedge.client.site.site_data``), so that the
next tasks of the run start with it instead of partitioning and resizing again.

Lifecycle: the SuperNode process (``fedge.client.supernode``) starts this one as
its child. It and every task it forks die with their parent, however the parent
dies (``prctl(PR_SET_PDEATHSIG)`` on Linux, plus a parent-pid watchdog), so no
process of a site outlives its SuperNode.

Run by ``fedge client start``; not meant to be started by hand.
"""

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

log = logging.getLogger("fedge.client.warm_executor")  # also when run as __main__

# Marker lines in the SuperNode's log; tests and the benchmark look for them.
MARKER_READY = "fedge warm executor: serving ClientApp tasks"
MARKER_FORKED = "fedge warm executor: forked ClientApp task"
_PR_SET_PDEATHSIG = 1
_WATCHDOG_INTERVAL_S = 0.5
# A pipe write up to this size is atomic: several children may report at once.
_PIPE_BUF = 4096


def _load_prctl() -> Any:
    """libc's ``prctl`` (Linux), loaded once before any fork; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    return libc.prctl


_PRCTL = _load_prctl()


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    Checks the parent afterwards: if it died before the call, the signal will
    never come, so exit now.
    """
    if _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def watch_parent(parent_pid: int, on_gone: Any) -> None:
    """Call ``on_gone`` once this process is no longer ``parent_pid``'s child (any platform)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_INTERVAL_S)
        on_gone()

    threading.Thread(target=watch, daemon=True, name="fedge-parent-watchdog").start()


def _preimport() -> None:
    """Import what every ClientApp of fedge needs, before any fork.

    Includes what torch imports lazily on a task's first training step: creating an
    optimizer imports ``torch._dynamo`` (``torch._compile._disable_dynamo``), about 1 s on
    these machines, which every forked task paid again inside its "training" stage. Only
    imports and a throwaway optimizer on a one-element tensor: nothing here runs a
    parallel (OpenMP) region, whose thread pool a forked child could not use.
    """
    import torch
    import torch._dynamo

    import fedge.client.app
    import fedge.client.site
    import fedge.shared.ml.partition  # noqa: F401

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    with contextlib.suppress(ImportError):
        import datasets  # noqa: F401  (flwr-datasets' partitioners)
        import flwr_datasets.partitioner  # noqa: F401
        import sklearn.datasets  # noqa: F401


class ForkExecutor:
    """Flower's executor interface; ``launch`` forks instead of exec'ing a new interpreter."""

    def __init__(self) -> None:
        from fedge.shared.ml.flower_compat import executor_api

        self._api = executor_api()
        self._fallback = self._api.SubprocessExecutor()
        self._children: set[int] = set()
        # Forked tasks report the data they loaded here (see the module docstring).
        self._loaded_r, self._loaded_w = os.pipe()
        os.set_blocking(self._loaded_r, False)
        self._pending = b""
        log.info("%s (pid %d)", MARKER_READY, os.getpid())

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self._fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self._fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        if spec.task_type != self._api.TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child: run one ClientApp task, then leave without cleanup of the parent's
            die_with_parent(parent)
            os.close(self._loaded_r)
            _report_loaded_data_to(self._loaded_w)
            os._exit(_run_task(spec))
        self._children.add(pid)
        log.info("%s %d (pid %d)", MARKER_FORKED, spec.task_id, pid)
        return self._api.LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children so none are left as zombies; cache data they loaded."""
        for pid in list(self._children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self._children.discard(pid)
        self._cache_reported_data()

    def _cache_reported_data(self) -> None:
        """Load what the children reported into this process's cache (main thread: fork-safe)."""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self._loaded_r, 65536):
                self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in dict.fromkeys(lines):  # the same report from several tasks: load once
            try:
                report = json.loads(line)
                from fedge.client.site import site_data
                from fedge.shared.config import RunConfig

                cfg = RunConfig.from_flower(report["run_config"])
                _, cached = site_data(cfg, str(report["data"]), str(report["label_column"]))
                log.info("site data %s for the next tasks", "kept" if cached else "cached")
            except Exception:  # a bad report costs a cache miss, never the executor
                log.exception("could not cache the site's data in the executor")

    def kill_children(self) -> None:
        """SIGKILL every task still running (the SuperNode they report to is gone)."""
        for pid in list(self._children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill_children()
        self._fallback.close()


def _report_loaded_data_to(fd: int) -> None:
    """In a forked task: tell the executor which data this task loaded (see ``reconcile``)."""
    from fedge.client.site import on_data_loaded

    def report(cfg: Any, data_spec: str, label_column: str) -> None:
        line = (
            json.dumps(
                {"run_config": cfg.to_flower(), "data": data_spec, "label_column": label_column}
            ).encode()
            + b"\n"
        )
        if len(line) <= _PIPE_BUF:
            with contextlib.suppress(OSError):
                os.write(fd, line)

    on_data_loaded(report)


def _run_task(spec: Any) -> int:
    from fedge.shared.ml.flower_compat import run_clientapp_task

    try:
        run_clientapp_task(spec)
    except SystemExit as e:  # run_clientapp always ends with flwr_exit
        return e.code if isinstance(e.code, int) else 0
    except BaseException:
        log.exception("ClientApp task failed")
        return 1
    return 0


def _log_to_stderr() -> None:
    """fedge's own lines go to the SuperNode's log (Flower's logger has its own handler)."""
    handler = logging.StreamHandler()
    # Unix times with milliseconds: the benchmark lines these up with the ServerApp's events.
    handler.setFormatter(logging.Formatter("%(created).3f %(levelname)-8s fedge: %(message)s"))
    root = logging.getLogger("fedge")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--task-poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    _log_to_stderr()
    executors: list[ForkExecutor] = []

    def parent_gone() -> None:
        log.warning("the SuperNode (pid %d) is gone: stopping", args.parent_pid)
        for executor in executors:
            executor.kill_children()
        os._exit(1)

    watch_parent(args.parent_pid, parent_gone)
    _preimport()
    from fedge.client.app_trust import guard_clientapp_installs

    guard_clientapp_installs()  # every task's FAB is checked before it is installed
    from fedge.shared.ml.flower_compat import run_superexec_with, shorten_object_pull_backoff

    # A task starts before its SuperNode has all of the message's objects: it asks again
    # (over loopback, cheaply) within the task poll, not after Flower's 1 s + 2 s.
    shorten_object_pull_backoff(args.task_poll, "clientapp")

    def make_executor() -> ForkExecutor:
        executors.append(ForkExecutor())
        return executors[-1]

    run_superexec_with(make_executor, args.runtime_api_address, args.parent_pid, args.task_poll)


if __name__ == "__main__":
    main()
