"""Check a HOST:PORT a server is about to listen on, so a mistake is named before it starts."""

import socket

from fedge.shared.errors import ConfigError


def check_listen_address(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or a port already taken.

    uvicorn would otherwise log its own line and exit 1 after fedge printed "serving on",
    or (a port above 65535) keep running without listening. The trial bind uses
    SO_REUSEADDR as uvicorn does; another process may still take the port in between.

    Raises
    ------
    ConfigError
        Naming the option and the reason.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1-65535)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} does not resolve to an address here") from e
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from e
