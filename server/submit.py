"""Submit a run to a SuperLink with Flower's own ``flwr run``, and follow it.

``flwr run --stream`` is the supported way to start a run and read the
ServerApp's output. fedge gives it an isolated ``FLWR_HOME`` holding just the
connection to this SuperLink, and turns the ServerApp's event lines (see
``fedge.server.events``) into callbacks for the CLI's progress display.
"""

import logging
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.server import events
from fedge.server.events import Event
from fedge.server.flower_app_config import APP_DIR
from fedge.shared.config import RunConfig, toml_value
from fedge.shared.errors import ConnectionFailed, RunError, SecurityError
from fedge.shared.processes import child_environment, flower_tool, port_open, split_address

log = logging.getLogger(__name__)
CONNECTION = "fedge"
RUN_LOG = "run.log"


def write_flower_home(home: Path, superlink: str, root_certificates: Path | None) -> Path:
    """A ``FLWR_HOME`` whose config.toml names one connection, ``fedge``."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f"address = {toml_value(superlink)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {toml_value(str(root_certificates.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def store_control_token(home: Path, superlink: str, token: str) -> None:
    """Make ``flwr`` send ``Authorization: Bearer <token>`` on every Control API call.

    flwr's CLI sends the access token of its OIDC account-auth plugin as a bearer header
    (``flwr.cli.cli_account_auth_interceptor``); fedge stores its own credential there,
    in this FLWR_HOME's credential file, so plain ``flwr run`` passes the fedge front. The
    refresh token is a placeholder: the front never asks for a refresh (no
    ``WWW-Authenticate: Bearer``), so flwr never uses it.
    """
    from flwr.cli.auth_plugin.oidc_cli_plugin import OidcCliPlugin
    from flwr.supercore.auth.typing import AccountAuthCredentials
    from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

    plugin = OidcCliPlugin(superlink)
    plugin.store = FileCredentialStore(home / "credentials.yaml")
    plugin.store_tokens(AccountAuthCredentials(access_token=token, refresh_token="unused"))


def submit_run(
    cfg: RunConfig,
    superlink: str,
    root_certificates: Path | None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    token: str | None = None,
    app_dir: Path = APP_DIR,
) -> dict[str, Any]:
    """Run ``cfg`` on the SuperLink at ``superlink`` and wait for it to finish.

    ``token`` is a fedge control credential (``fedge server grant``), needed by a server
    whose control API sits behind the fedge front.

    Returns
    -------
    dict
        The run's summary (what the ServerApp wrote to summary.json).

    Raises
    ------
    ConnectionFailed
        If the SuperLink cannot be reached.
    RunError
        If the run fails; the message points at the run log.
    """
    host, port = split_address(superlink)
    if not port_open(host, port, timeout=3.0):
        raise ConnectionFailed(f"cannot reach the server at {superlink}")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / RUN_LOG
    summary: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    refused = False
    with tempfile.TemporaryDirectory(prefix="fedge-flwr-") as tmp:
        home = write_flower_home(Path(tmp) / "flwr", superlink, root_certificates)
        if token is not None:
            store_control_token(home, superlink, token)
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(
            "".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flower().items())
        )
        command = [
            flower_tool("flwr"),
            "run",
            str(app_dir),
            CONNECTION,
            "--run-config",
            str(overrides),
            "--stream",
        ]
        env = child_environment({"FLWR_HOME": str(home)})
        with open(log_path, "a", encoding="utf-8") as run_log:
            proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    run_log.write(line)
                    run_log.flush()
                    # flwr's words when the fedge front answers 401 (no valid credential).
                    refused = refused or "Authentication failed" in line
                    event = events.parse(line)
                    if event is None:
                        continue
                    if event.get("event") == Event.DONE:
                        summary = dict(event.get("summary", {}))
                    if event.get("event") == Event.ERROR:
                        failure = event
                        break
                    if on_event is not None:
                        on_event(event)
                    if summary is not None:
                        break  # the run is over; `flwr run --stream` may linger
            finally:
                if proc.poll() is None:
                    proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    if failure is not None:
        raise RunError(
            f"the run failed on the server: {failure.get('message')}", failure.get("hint")
        )
    if summary is None and refused:
        raise SecurityError(
            f"the server at {superlink} refused to start the run: no valid control credential",
            hint="ask the operator for one (`fedge server grant NAME`), then pass "
            "--token-file FILE or set FEDGE_TOKEN",
        )
    if summary is None:
        raise RunError(f"the run ended without a summary; see {log_path}")
    return summary
