"""Start and stop Flower's SuperLink, the coordinator every site connects to.

fedge always starts it with its state database on disk, runtime dependency
installation off and telemetry off; with TLS and SuperNode authentication
unless the operator opts out explicitly (``--insecure``).
"""

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fedge.shared.atomic import atomic_write_text
from fedge.shared.errors import ConfigError
from fedge.shared.processes import (
    ProcessGroup,
    child_environment,
    flower_tool,
    is_running,
    port_open,
    spawn,
    stop_process,
    wait_until,
)
from fedge.shared.tls import TLSFiles

log = logging.getLogger(__name__)
PID_FILE = "superlink.pid"
LOG_FILE = "superlink.log"
DEFAULT_PORT = 9092
# Environment the SuperLink is started with, inherited by the ServerApp process: only the
# SuperLink knows whether it runs with TLS and SuperNode authentication (privacy record).
ENV_TLS = "FEDGE_SUPERLINK_TLS"
ENV_AUTH = "FEDGE_SUPERLINK_AUTH"


@dataclass(frozen=True)
class SuperLinkSpec:
    """How to run one SuperLink."""

    data_dir: Path
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    tls: TLSFiles | None = None
    # Folders besides DATA_DIR/runs where submitted runs may write (fedge.server.run_paths).
    run_roots: tuple[Path, ...] = ()

    @property
    def supernode_auth(self) -> bool:
        # Flower requires TLS for SuperNode authentication: with TLS it is always on.
        return self.tls is not None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host


def superlink_command(spec: SuperLinkSpec) -> list[str]:
    """The ``flower-superlink`` command line for ``spec``."""
    command = [
        flower_tool("flower-superlink"),
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--database",
        str(spec.data_dir / "state.db"),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "subprocess",
    ]
    if spec.tls is None:
        command.append("--insecure")
    else:
        command += [*spec.tls.superlink_args(), "--enable-supernode-auth"]
    return command


def superlink_environment(spec: SuperLinkSpec) -> dict[str, str]:
    """Child environment; tells the ServerApp (a grandchild) how the link is secured.

    It also names the server's data dir and the allowed run folders, so that the ServerApp
    confines the paths a submitter chooses (``fedge.server.run_paths``).
    """
    import os

    from fedge.server.run_paths import ENV_DATA_DIR, ENV_RUN_ROOTS, ENV_START_DIR

    roots = [r for r in os.environ.get(ENV_RUN_ROOTS, "").split(os.pathsep) if r.strip()]
    roots += [str(Path(r).resolve()) for r in spec.run_roots]
    return child_environment(
        {
            ENV_TLS: "1" if spec.tls else "0",
            ENV_AUTH: "1" if spec.supernode_auth else "0",
            ENV_DATA_DIR: str(spec.data_dir.resolve()),
            ENV_START_DIR: os.getcwd(),
            ENV_RUN_ROOTS: os.pathsep.join(roots),
        }
    )


def start_superlink(
    spec: SuperLinkSpec, group: ProcessGroup | None = None, timeout: float = 60.0
) -> subprocess.Popen[bytes]:
    """Start a SuperLink in the background and wait until its port answers."""
    spec.data_dir.mkdir(parents=True, exist_ok=True)
    if port_open(spec.connect_host, spec.port):
        raise ConfigError(f"port {spec.port} is already in use; choose another with --port")
    command = superlink_command(spec)
    env = superlink_environment(spec)
    proc = (
        group.start("superlink", command, spec.log_path, env)
        if group is not None
        else spawn(command, spec.log_path, env)
    )
    atomic_write_text(spec.data_dir / PID_FILE, f"{proc.pid}\n")
    wait_until(
        lambda: port_open(spec.connect_host, spec.port),
        timeout,
        f"the SuperLink on port {spec.port}",
        proc,
        spec.log_path,
    )
    return proc


def stop_superlink(data_dir: Path) -> bool:
    """Stop the SuperLink whose pid file is in ``data_dir``; False if none was running."""
    pid_file = data_dir / PID_FILE
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text().strip())
    except ValueError:
        pid_file.unlink(missing_ok=True)
        return False
    running = is_running(pid)
    if running:
        stop_process(pid)
    pid_file.unlink(missing_ok=True)
    return running
