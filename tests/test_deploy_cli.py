"""``fedge edge agent|serve`` and ``fedge registry serve``: argument handling, errors, token."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from deploy_support import make_keys
from typer.testing import CliRunner

from fedge.cli.deploy import read_token, register
from fedge.server.registry.api import resolve_tls
from fedge.shared.errors import ConfigError, ConnectionFailed, ExitCode, SecurityError
from fedge.shared.processes import free_port
from fedge.shared.tls import ensure_server_certificate


@pytest.fixture
def edge_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def fedge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``fedge`` entry point (its one error wrapper included), as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_COLOR": "1", **(env or {})},
    )  # fmt: skip


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: ExitCode) -> str:
    """A user mistake: the error's own exit code, one ``error:`` line (+ a hint), no traceback.

    Logged warnings (``WARNING name: ...``, e.g. plain HTTP) may come before it.
    """
    lines = [x for x in done.stderr.strip().splitlines() if not x.startswith("WARNING ")]
    assert done.returncode == int(code), done.stdout + done.stderr
    assert lines and lines[0].startswith("error: "), done.stderr
    assert all(line.startswith("hint: ") for line in lines[1:]), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


def test_register_adds_agent_and_serve(edge_app: typer.Typer) -> None:
    root = typer.main.get_command(edge_app)
    assert set(root.commands) >= {"agent", "serve"}  # type: ignore[attr-defined]
    options = {o for p in root.commands["agent"].params for o in p.opts}  # type: ignore[attr-defined]
    assert {"--server", "--dir", "--token", "--token-file", "--key", "--once"} <= options


def test_serve_argument_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    neither = assert_one_line_error(fedge("edge", "serve"), ExitCode.CONFIG)
    both = fedge("edge", "serve", str(tmp_path), "--agent-dir", str(tmp_path))
    assert_one_line_error(both, ExitCode.CONFIG)
    missing = fedge("edge", "serve", str(tmp_path / "nothing"), "--key", str(tmp_path / "k.pub"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert neither != ""


def test_agent_argument_errors_are_one_line_and_never_echo_the_token(tmp_path: Path) -> None:
    _, public = make_keys(tmp_path / "keys")
    base = ["edge", "agent", "--once", "--server", f"http://127.0.0.1:{free_port()}",
            "--dir", str(tmp_path / "d"), "--key", str(public)]  # fmt: skip
    token_file = tmp_path / "token"
    token_file.write_text("fedge_dev_secret\n")
    token_file.chmod(0o600)
    both = fedge(*base, "--token", "fedge_dev_other", "--token-file", str(token_file))
    assert "exactly one" in assert_one_line_error(both, ExitCode.CONFIG)
    neither = fedge(*base, env={"FEDGE_DEVICE_TOKEN": ""})
    assert_one_line_error(neither, ExitCode.CONFIG)
    unreachable = fedge(*base, "--token-file", str(token_file))
    assert_one_line_error(unreachable, ExitCode.CONNECTION)
    # The token comes from the environment as well; it is never printed.
    from_env = fedge(*base, env={"FEDGE_DEVICE_TOKEN": "fedge_dev_secret"})
    assert_one_line_error(from_env, ExitCode.CONNECTION)
    for done in (both, unreachable, from_env):
        assert "fedge_dev_secret" not in done.stdout + done.stderr
        assert "fedge_dev_other" not in done.stdout + done.stderr


def test_token_sources(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("fedge_dev_abc\n")
    token_file.chmod(0o600)
    assert read_token(None, token_file) == "fedge_dev_abc"
    assert read_token(" fedge_dev_x ", None) == "fedge_dev_x"
    assert "readable by other users" not in caplog.text
    token_file.chmod(0o644)
    assert read_token(None, token_file) == "fedge_dev_abc"
    assert "readable by other users" in caplog.text and "fedge_dev_abc" not in caplog.text
    with pytest.raises(ConfigError, match="cannot read token file"):
        read_token(None, tmp_path / "missing")
    with pytest.raises(ConfigError, match="exactly one"):
        read_token("a", token_file)
    with pytest.raises(ConfigError, match="exactly one"):
        read_token(None, None)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(None, tmp_path / "empty")


def test_agent_once_against_nothing_fails_with_connection_error(
    edge_app: typer.Typer, tmp_path: Path
) -> None:
    _, public = make_keys(tmp_path / "keys")
    args = ["agent", "--once", "--server", f"http://127.0.0.1:{free_port()}", "--dir",
            str(tmp_path / "d"), "--token", "fedge_dev_x", "--key", str(public)]  # fmt: skip
    result = CliRunner().invoke(edge_app, args)
    assert isinstance(result.exception, ConnectionFailed)
    assert "fedge_dev_x" not in result.output  # the token is never printed
    args[-1] = str(tmp_path / "missing.pub")
    missing_key = CliRunner().invoke(edge_app, args)
    assert isinstance(missing_key.exception, SecurityError)


def test_serve_needs_exactly_one_source(edge_app: typer.Typer, tmp_path: Path) -> None:
    neither = CliRunner().invoke(edge_app, ["serve"])
    assert isinstance(neither.exception, ConfigError)
    both = CliRunner().invoke(edge_app, ["serve", str(tmp_path), "--agent-dir", str(tmp_path)])
    assert isinstance(both.exception, ConfigError)


def test_registry_tls_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_HOME", str(tmp_path / "home"))
    assert resolve_tls(None, None, insecure=True) is None
    with pytest.raises(ConfigError, match="both"):
        resolve_tls(tmp_path / "c.pem", None, insecure=False)
    with pytest.raises(ConfigError, match="no TLS certificate"):
        resolve_tls(None, None, insecure=False)
    # The server's own CA-issued certificate is the default once `fedge server start` made it.
    files = ensure_server_certificate(tmp_path / "home" / "server" / "tls", [])
    assert resolve_tls(None, None, insecure=False) == (files.cert, files.key)
