"""Talk to the SuperLink's Control API through the ``flwr`` CLI, isolated from ``~/.flwr``.

``flwr supernode register / unregister / list --format json`` run as subprocesses with
``FLWR_HOME`` under the server's data dir, holding one connection to this SuperLink.
flwr reports a closed port and a failed TLS handshake alike ("unavailable"), so a
probe first tells them apart; and in JSON mode it exits 0 even on failure, so the
``success`` field of its answer is what counts.
"""

import datetime
import json
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

from fedge.shared.atomic import atomic_write_text
from fedge.shared.errors import ConfigError, ConnectionFailed, SecurityError
from fedge.shared.processes import child_environment, flower_tool, split_address

FLWR_HOME_NAME = "flwr-cli"
CONNECTION = "fedge"
FLWR_TIMEOUT_S = 60.0


def _local_address(superlink_address: str) -> tuple[str, int, str]:
    host, port = split_address(superlink_address)
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind address is not something to dial
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return host, port, shown


def probe(superlink_address: str, tls_ca: Path | None) -> None:
    """Fail fast and precisely: nothing listening, or a TLS handshake that does not verify.

    ``flwr`` reports both as "Connection to the SuperLink is unavailable".
    """
    host, port, shown = _local_address(superlink_address)
    try:
        sock = socket.create_connection((host, port), timeout=5)
    except OSError as e:
        raise ConnectionFailed(
            f"no SuperLink is listening at {shown} ({e.strerror or e})",
            hint="start it with `fedge server start`, or pass the right --superlink HOST:PORT",
        ) from e
    with sock:
        if tls_ca is None:
            return
        context = ssl.create_default_context(cafile=str(tls_ca))
        try:
            with context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as e:
            raise SecurityError(
                f"the SuperLink at {shown} presents a certificate that {tls_ca} does not "
                f"verify ({e.verify_message})"
            ) from e
        except (ssl.SSLError, OSError) as e:
            raise SecurityError(
                f"TLS handshake with the SuperLink at {shown} failed ({e}); is it running "
                "with --insecure?"
            ) from e


def flwr_home(data_dir: Path | str, superlink_address: str, tls_ca: Path | None) -> Path:
    """Write the isolated ``FLWR_HOME`` whose default connection is this SuperLink.

    Never the user's ``~/.flwr``: its connections and credentials are not fedge's.
    """
    home = Path(data_dir) / FLWR_HOME_NAME
    _, _, shown = _local_address(superlink_address)
    security = (
        "insecure = true"
        if tls_ca is None
        else "root-certificates = " + json.dumps(str(Path(tls_ca).resolve()))
    )
    # json.dumps gives a valid TOML basic string (quotes and backslashes escaped).
    toml = (
        f"[superlink]\ndefault = {json.dumps(CONNECTION)}\n\n"
        f"[superlink.{CONNECTION}]\naddress = {json.dumps(shown)}\n{security}\n"
    )
    atomic_write_text(home / "config.toml", toml)
    return home


_NOISE = ("Using SuperLink", "Listing all nodes", "For more information")


def _flwr_message(text: str) -> str:
    """The line of flwr's output that says what went wrong, without its banners."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "Exit Code:" not in line and not line.strip().startswith(_NOISE)
    ]
    coded = [line for line in lines if line.startswith("[code:")]
    return (coded or lines or ["no output"])[0]


def run_flwr(
    args: list[str], data_dir: Path, superlink_address: str, tls_ca: Path | None, action: str
) -> dict[str, Any]:
    """Run ``flwr supernode ... --format json`` and return its JSON answer.

    flwr exits 0 even when the request failed in JSON mode: ``success`` is what counts.
    """
    probe(superlink_address, tls_ca)
    home = flwr_home(data_dir, superlink_address, tls_ca)
    env = child_environment(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # flwr would otherwise phone home
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "1000",  # keep rich from wrapping the JSON
        }
    )
    command = [flower_tool("flwr"), "supernode", *args, CONNECTION, "--format", "json"]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=FLWR_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise ConnectionFailed(
            f"`flwr supernode` did not answer within {FLWR_TIMEOUT_S:.0f}s ({action})"
        ) from e
    except FileNotFoundError as e:
        raise ConfigError("the `flwr` command is not installed beside fedge") from e
    start, end = done.stdout.find("{"), done.stdout.rfind("}")
    try:
        answer = json.loads(done.stdout[start : end + 1]) if start >= 0 else None
    except json.JSONDecodeError:
        answer = None
    if isinstance(answer, dict) and answer.get("success") is True:
        return answer
    message = _flwr_message(
        str(answer.get("error-message", "")) if isinstance(answer, dict) else done.stderr
    )
    if "unavailable" in message.lower():
        raise ConnectionFailed(f"the SuperLink at {superlink_address} is unavailable ({action})")
    raise SecurityError(f"the SuperLink refused to {action}: {message}")


def remote_nodes(
    data_dir: Path, superlink_address: str, tls_ca: Path | None
) -> dict[int, dict[str, Any]]:
    """``flwr supernode list``: node id -> flwr's JSON row (status, online-at, offline-at...)."""
    answer = run_flwr(["list"], data_dir, superlink_address, tls_ca, "list SuperNodes")
    return {int(node["node-id"]): node for node in answer.get("nodes", [])}


def parse_time(value: object) -> datetime.datetime | None:
    """flwr's ``2026-11-30 03:24:29Z`` (or ``N/A``) -> an aware datetime."""
    if not isinstance(value, str) or value in ("", "N/A"):
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None
