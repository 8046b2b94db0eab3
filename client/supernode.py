"""Start a Flower SuperNode that serves one site's data to the federation.

The node config carries the site's data spec and name; it stays on the site
(it reaches only this site's ClientApp processes). Each SuperNode also opens a
local port for its ClientApps; fedge picks a free one so that several sites can
run on one host.

The SuperNode runs in a small fedge process (``python -m fedge.client.supernode``)
that shortens Flower's hard-coded idle poll and starts the warm executor as its
own child, so that the executor dies with it (``fedge.client.warm_executor``).
"""

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from fedge.shared import records
from fedge.shared.config import toml_value
from fedge.shared.processes import ProcessGroup, child_environment, free_port, spawn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SuperNodeSpec:
    """How to run one site's SuperNode."""

    superlink: str  # HOST:PORT
    site: str
    data: str
    log_dir: Path
    root_certificates: Path | None = None  # None: plaintext (only with an insecure server)
    private_key: Path | None = None  # the site's enrolled key (SuperNode authentication)
    label_column: str = "label"
    init_weights: str = ""
    local_port: int = 0  # 0: pick a free one
    # True: fedge's forking SuperExec (``fedge.client.warm_executor``) starts the ClientApps;
    # False: Flower's default, a fresh ``flwr-clientapp`` process per message.
    warm: bool = True
    # Longest wait of the SuperNode between asks for work (Flower hard-codes 3 s): each stage
    # of a round waits for it. Shorter means more requests from an idle site to the SuperLink.
    idle_poll: float = 1.0
    policy: Path | None = None  # the site's privacy policy (TOML); None: accept any run
    ledger: Path | None = None  # the site's privacy ledger; None: no lifetime accounting
    # torch's CPU threads in each ClientApp; 0: torch's default, one per core. Sites that
    # share a machine should split its cores (``LocalFederation`` does): OpenMP threads of
    # several sites spinning on the same cores slowed a tiny round (see docs/flower-seam.md).
    threads: int = 0

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"supernode-{self.site}.log"


def node_config(spec: SuperNodeSpec) -> str:
    """Flower's ``--node-config`` string: space-separated TOML key=value pairs."""
    values = {
        records.NODE_SITE: spec.site,
        records.NODE_DATA: spec.data,
        records.NODE_LABEL_COLUMN: spec.label_column,
    }
    if spec.init_weights:
        values[records.NODE_INIT_WEIGHTS] = spec.init_weights
    if spec.policy is not None:
        values[records.NODE_POLICY] = str(Path(spec.policy).resolve())
    if spec.ledger is not None:
        values[records.NODE_LEDGER] = str(Path(spec.ledger).resolve())
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def supernode_command(spec: SuperNodeSpec, port: int) -> list[str]:
    """The command line for ``spec``'s SuperNode; ``port`` is its local Runtime API.

    It runs ``flower-supernode`` inside ``fedge.client.supernode`` (see ``main``).
    """
    fedge_args = ["--idle-poll", str(spec.idle_poll)]
    if spec.warm:
        fedge_args += ["--warm-executor", f"127.0.0.1:{port}"]
    return [
        sys.executable,
        "-m",
        "fedge.client.supernode",
        *fedge_args,
        "--",
        *_flower_args(spec, port),
    ]


def _flower_args(spec: SuperNodeSpec, port: int) -> list[str]:
    """``flower-supernode``'s own arguments."""
    command = [
        "--superlink",
        spec.superlink,
        "--node-config",
        node_config(spec),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--isolation",
        "process" if spec.warm else "subprocess",
    ]
    if spec.root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(spec.root_certificates)]
    if spec.private_key is not None:
        command += ["--auth-supernode-private-key", str(spec.private_key)]
    return command


def supernode_environment(spec: SuperNodeSpec) -> dict[str, str]:
    """The SuperNode's environment; its executor and ClientApps inherit it.

    ``spec.threads`` becomes ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which torch reads
    when it starts: Flower's own ``flwr-clientapp`` processes and fedge's forked tasks
    alike (the warm executor runs no parallel region before it forks).
    """
    if spec.threads < 0:
        raise ValueError(f"threads must be 0 (torch's default) or more, not {spec.threads}")
    extra = {}
    if spec.threads:
        extra = {name: str(spec.threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return child_environment(extra)


def start_supernode(
    spec: SuperNodeSpec, group: ProcessGroup | None = None
) -> subprocess.Popen[bytes]:
    """Start the SuperNode (and its warm executor) in the background.

    Output goes to ``spec.log_path``. The executor is the SuperNode's child and
    dies with it, so stopping (or killing) the returned process stops the site.
    """
    port = spec.local_port or free_port()
    if not spec.warm:
        # Flower's own flwr-clientapp processes do not check the run's app package
        # (fedge.client.app_trust): only benchmarks comparing against Flower use this.
        log.warning("site %s: Flower's default executor, the app package is NOT checked", spec.site)
    command = supernode_command(spec, port)
    name = f"supernode {spec.site}"
    env = supernode_environment(spec)
    if group is not None:
        return group.start(name, command, spec.log_path, env)
    return spawn(command, spec.log_path, env)


def _start_executor(runtime_api_address: str) -> subprocess.Popen[bytes]:
    """Start the warm executor as this (the SuperNode's) process's child, same log, same group."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedge.client.warm_executor",
            "--runtime-api-address",
            runtime_api_address,
            "--parent-pid",
            str(os.getpid()),
        ],
        stdin=subprocess.DEVNULL,
    )


def _stop_when_executor_dies(executor: subprocess.Popen[bytes]) -> None:
    """Reap the executor; if it dies, stop this SuperNode too, rather than serve no tasks."""

    def wait() -> None:
        code = executor.wait()
        log.error("fedge: the warm executor exited (code %s): stopping the SuperNode", code)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, daemon=True, name="fedge-executor-reaper").start()


_MESSAGE_WORDS = (("Receiving:", "message in:"), ("Sending:", "message out:"))


class _MessageTimes(logging.Handler):
    """Notes when Flower's SuperNode receives and sends a message, with a Unix time.

    Worded unlike Flower's own "Receiving:"/"Sending:" lines, which tests count.
    """

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for flower, ours in _MESSAGE_WORDS:
            if text.startswith(flower):
                rest = text[len(flower) :].strip()
                sys.stderr.write(f"{record.created:.3f} fedge: supernode {ours} {rest}\n")


def _timestamp_message_lines() -> None:
    """Log when each message comes in and goes out (for the round breakdown)."""
    logging.getLogger("flwr").addHandler(_MessageTimes())


def main(argv: list[str] | None = None) -> None:
    """``python -m fedge.client.supernode [--idle-poll S] [--warm-executor ADDR] -- FLOWER...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-poll", type=float, default=1.0)
    parser.add_argument("--warm-executor", metavar="RUNTIME_API_ADDRESS", default="")
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    from fedge.shared.ml.flower_compat import (
        run_supernode,
        shorten_object_pull_backoff,
        shorten_supernode_polls,
    )

    shorten_supernode_polls(args.idle_poll)
    # The message's objects, pulled from the SuperLink: retried as often as the idle poll.
    shorten_object_pull_backoff(args.idle_poll, "supernode")
    _timestamp_message_lines()
    if args.warm_executor:
        _stop_when_executor_dies(_start_executor(args.warm_executor))
    run_supernode(flower_args)


if __name__ == "__main__":
    main()
