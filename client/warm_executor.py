"""A SuperExec for a site that starts each ClientApp by forking a warm process.

Flower's SuperNode runs every message (train, evaluate, each SecAgg+ stage) in
a fresh ``flwr-clientapp`` process, which pays for a new interpreter and for
importing torch each time: most of a round's wall time on a small model. With
``flower-supernode --isolation process``, Flower lets the operator run the
SuperExec; this one imports torch and fedge once, then forks a child per task
that runs Flower's own ``run_clientapp`` (same Runtime API, same token, same
isolation from the SuperNode; only the start-up is shared).

Run by ``fedge client start``; not meant to be started by hand.
"""

import argparse
import contextlib
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def _preimport() -> None:
    """Import what every ClientApp of fedge needs, before any fork."""
    import fedge.client.app
    import fedge.client.site
    import fedge.shared.ml.partition  # noqa: F401

    with contextlib.suppress(ImportError):
        import datasets  # noqa: F401  (flwr-datasets' partitioners)
        import flwr_datasets.partitioner  # noqa: F401
        import sklearn.datasets  # noqa: F401


class ForkExecutor:
    """Flower's executor interface; ``launch`` forks instead of exec'ing a new interpreter."""

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._fallback = SubprocessExecutor()
        self._children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: Any, **kwargs: Any) -> Any:
        return self._fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, task_type: Any = None, **kwargs: Any) -> None:
        self._fallback.wait_for_capacity(task_type, **kwargs)

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        pid = os.fork()
        if pid == 0:  # child: run one ClientApp task, then leave without cleanup of the parent's
            os._exit(_run_task(spec))
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children so none are left as zombies."""
        for pid in list(self._children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self._children.discard(pid)

    def close(self) -> None:
        self._fallback.close()


def _run_task(spec: Any) -> int:
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
    except SystemExit as e:  # run_clientapp always ends with flwr_exit
        return e.code if isinstance(e.code, int) else 0
    except BaseException:
        log.exception("ClientApp task failed")
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    _preimport()
    from fedge.client.app_trust import guard_clientapp_installs

    guard_clientapp_installs()  # every task's FAB is checked before it is installed
    from flwr.supercore.superexec import run_superexec as superexec

    # Flower picks its executor through this factory; hand it the forking one.
    superexec.get_executor = lambda *_a, **_k: ForkExecutor()
    superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on 127.0.0.1 only
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
