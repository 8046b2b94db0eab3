"""``fedge edge agent|serve`` and ``fedge registry serve`` argument handling (CliRunner)."""

from pathlib import Path

import pytest
import typer
from deploy_support import make_keys
from typer.testing import CliRunner

from fedge.cli.deploy import read_token, register
from fedge.server.registry.api import resolve_tls
from fedge.shared.errors import ConfigError, ConnectionFailed, SecurityError
from fedge.shared.processes import free_port
from fedge.shared.tls import ensure_server_certificate


@pytest.fixture
def edge_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_register_adds_agent_and_serve(edge_app: typer.Typer) -> None:
    help_text = CliRunner().invoke(edge_app, ["--help"]).output
    assert "agent" in help_text and "serve" in help_text


def test_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "t"
    token_file.write_text("fedge_dev_abc\n")
    assert read_token(None, token_file) == "fedge_dev_abc"
    assert read_token(" fedge_dev_x ", None) == "fedge_dev_x"
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
