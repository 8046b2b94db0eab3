"""The coordinator as one unit: SuperLink + registry API, started and stopped together.

``fedge server start`` is a thin command over ``start_server``; every other operator
command finds the running coordinator through the state file ``DATA_DIR/server.json``
that ``start_server`` writes (``read_state``). Torch-free: starting a server must not
pay for importing torch.
"""

import json
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from fedge.server.superlink import SuperLinkSpec, start_superlink, stop_superlink
from fedge.shared.atomic import atomic_write_json
from fedge.shared.errors import ConfigError
from fedge.shared.processes import stop_process

STATE_FILE = "server.json"
DEFAULT_REGISTRY_PORT = 9443


@dataclass(frozen=True)
class ServerState:
    """What ``DATA_DIR/server.json`` records about a started coordinator."""

    address: str
    ca_cert: str | None
    pid: int
    registry_pid: int | None
    # With TLS the SuperLink listens on loopback (control_address) behind the fedge front
    # (fedge.server.front), which owns the public port; operator commands on this machine
    # use control_address.
    control_address: str | None = None
    front_pid: int | None = None

    @property
    def local_control(self) -> str:
        return self.control_address or self.address

    @property
    def ca_path(self) -> Path | None:
        return Path(self.ca_cert) if self.ca_cert else None


@dataclass(frozen=True)
class StartedServer:
    """A coordinator just started: its processes, its state and where a person reaches it."""

    superlink: "subprocess.Popen[bytes]"
    registry: "subprocess.Popen[bytes] | None"
    state: ServerState
    host: str
    port: int
    log_path: Path
    registry_url: str | None
    tls: bool
    front: "subprocess.Popen[bytes] | None" = None  # the fedge front (TLS servers)


def read_state(data_dir: Path) -> ServerState:
    """The coordinator started with ``data_dir``.

    Raises
    ------
    ConfigError
        No server was ever started there, or its state file is unreadable.
    """
    path = data_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"no server was started with data dir {data_dir}",
            hint="run `fedge server start` (or pass the --data-dir it was started with)",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ServerState(
            address=str(data["address"]),
            ca_cert=data.get("ca_cert"),
            pid=int(data["pid"]),
            registry_pid=int(data["registry_pid"]) if data.get("registry_pid") else None,
            control_address=data.get("control_address"),
            front_pid=int(data["front_pid"]) if data.get("front_pid") else None,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a fedge server state file: {e}") from e


def public_host(host: str) -> str:
    """The name a site dials for a server bound to ``host`` (the machine's, for wildcards)."""
    return socket.gethostname() if host in ("0.0.0.0", "::") else host


def start_server(
    data_dir: Path,
    host: str = "0.0.0.0",
    port: int = 9092,
    registry_port: int = DEFAULT_REGISTRY_PORT,
    sans: list[str] | None = None,
    insecure: bool = False,
) -> StartedServer:
    """Start the SuperLink (TLS + SuperNode auth unless ``insecure``) and the registry API.

    Parameters
    ----------
    data_dir
        Server state: SuperLink database, CA and certificate, site and device registries.
    registry_port
        Port of the registry / fleet API for devices; 0 leaves it off.
    sans
        Extra host names or IPs that sites dial, added to the server certificate.

    Returns
    -------
    StartedServer
        The recorded state (also written to ``DATA_DIR/server.json``) and the addresses.
    """
    from fedge.shared.listen import check_listen_address
    from fedge.shared.tls import ensure_server_certificate

    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file; give the server's state folder")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    if registry_port:
        if registry_port == port:
            raise ConfigError(f"--registry-port {registry_port} is --port too; give another")
        # The registry runs as a child nobody waits on: a taken port would leave it dead
        # while `fedge server start` reports success.
        check_listen_address(host, registry_port)
    tls = None if insecure else ensure_server_certificate(data_dir / "tls", list(sans or []))
    front_pid, front_proc = None, None
    if tls is None:
        spec = SuperLinkSpec(data_dir, host, port, tls)
        proc = start_superlink(spec)
    else:
        # The SuperLink listens on loopback only; the front owns the public port and lets
        # sites reach only the Fleet API (docs/sovereign-sites.md).
        from fedge.server.front import FrontSpec, start_front
        from fedge.shared.processes import free_port

        spec = SuperLinkSpec(data_dir, "127.0.0.1", free_port(), tls)
        proc = start_superlink(spec)
        front = FrontSpec(data_dir, host, port, spec.port, tls.cert, tls.key, tls.ca_cert)
        try:
            front_proc = start_front(front)
            front_pid = front_proc.pid
        except BaseException:
            stop_superlink(data_dir)  # never leave a SuperLink without its front
            raise
    registry, registry_url = None, None
    if registry_port:
        from fedge.server.registry.api import start_registry_server
        from fedge.server.registry.publish import REGISTRY_SUBDIR

        registry = start_registry_server(
            data_dir / REGISTRY_SUBDIR,
            host,
            registry_port,
            tls.cert if tls else None,
            tls.key if tls else None,
        )
        registry_url = f"{'https' if tls else 'http'}://{public_host(host)}:{registry_port}"
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    state = ServerState(
        address=f"{connect_host}:{port}",
        ca_cert=str(tls.ca_cert) if tls else None,
        pid=proc.pid,
        registry_pid=registry.pid if registry else None,
        control_address=f"127.0.0.1:{spec.port}" if tls else None,
        front_pid=front_pid,
    )
    atomic_write_json(data_dir / STATE_FILE, asdict(state))
    return StartedServer(
        proc, registry, state, host, port, spec.log_path, registry_url, tls is not None, front_proc
    )


def stop_server(data_dir: Path) -> bool:
    """Stop the registry API and the SuperLink of ``data_dir``; False if none was running."""
    path = data_dir / STATE_FILE
    if path.is_file():
        try:
            registry_pid = read_state(data_dir).registry_pid
        except ConfigError:
            registry_pid = None
        if registry_pid:
            stop_process(registry_pid)
    from fedge.server.front import stop_front

    stop_front(data_dir)
    return stop_superlink(data_dir)
