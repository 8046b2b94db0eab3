"""A new user's mistakes on the command line: one line of error, a non-zero exit, no traceback.

Each case was found by trying the documented commands with wrong paths or files; before its
fix it ended in a Python traceback. ``main`` runs in process (no interpreter start per case).
"""

import sys
from pathlib import Path

import pytest

from fedge.cli import main
from fedge.shared.errors import ExitCode


def fedge(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple:
    """Run ``fedge ARGS`` in process; return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["fedge", *args])
    with pytest.raises(SystemExit) as end:
        main()
    return end.value.code, capsys.readouterr().err


def assert_one_line_error(err: str) -> None:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("hint: ") for line in lines[1:])


def test_keys_create_where_a_file_blocks_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "afile").write_text("")
    code, err = fedge(monkeypatch, capsys, "keys", "create", "--key", str(tmp_path / "afile/k.key"))
    assert code == ExitCode.SECURITY
    assert_one_line_error(err)
    assert "cannot write the key pair" in err


def test_keys_create_force_onto_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "keys").mkdir()
    code, err = fedge(
        monkeypatch, capsys, "keys", "create", "--key", str(tmp_path / "keys"), "--force"
    )
    assert code == ExitCode.SECURITY
    assert_one_line_error(err)
    assert "is a directory" in err
    assert (tmp_path / "keys").is_dir()


def test_access_request_into_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "afile").write_text("")
    args = ("access", "request", "--name", "bob", "--server", "127.0.0.1:9", "--folder")
    code, err = fedge(monkeypatch, capsys, *args, str(tmp_path / "afile"))
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert "cannot make the access folder" in err


def test_run_config_with_a_privacy_value_instead_of_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "run.toml").write_text("privacy = 5\n")
    args = ("run", "--config", str(tmp_path / "run.toml"), "--insecure", "--server", "127.0.0.1:9")
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert "'privacy' must be a table" in err


@pytest.mark.parametrize("command", ["export", "validate"])
@pytest.mark.parametrize("bar", ["nan", "inf", "101"])
def test_a_gate_bar_that_is_not_a_number_of_points_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    command: str,
    bar: str,
) -> None:
    """`--max-accuracy-drop nan` passed every artifact: `drop > nan` is always False."""
    extra = ["--central"] if command == "export" else []
    args = (command, str(tmp_path / "missing"), "--max-accuracy-drop", bar, *extra)
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert "--max-accuracy-drop must be a number of points in [-100, 100]" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-body-mb", "nan"], "--max-body-mb must be above 0"),  # was a ValueError
        (["--max-body-mb", "inf"], "--max-body-mb must be above 0"),  # was an OverflowError
        (["--batch-delay-ms", "inf"], "--batch-delay-ms must be 0 to 1000"),  # was accepted
        (["--workers", "100000"], "--workers 100000: at most"),  # spawned until memory ran out
        (["--port", "99999"], "--port 99999 is not a TCP port"),
        (["--host", "nohost.invalid"], "does not resolve"),  # uvicorn's log line, exit 1
    ],
)
def test_edge_serve_options_out_of_range(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    options: list[str],
    message: str,
) -> None:
    args = ("edge", "serve", str(tmp_path / "bundle"), "--key", str(tmp_path / "k.pub"))
    code, err = fedge(monkeypatch, capsys, *args, "--port", "18080", *options)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert message in err


def test_edge_serve_on_a_port_in_use_says_so_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It printed "serving on ..." and then uvicorn's own error, exit 1."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = ("edge", "serve", str(tmp_path / "bundle"), "--key", str(tmp_path / "k.pub"))
        code, err = fedge(monkeypatch, capsys, *args, "--port", port)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert f"cannot listen on 127.0.0.1:{port}" in err


def test_registry_serve_with_a_file_that_is_no_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """uvicorn's ssl.SSLError ended in a traceback."""
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("not PEM\n")
    tls = ("--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"))
    args = ("registry", "serve", "--port", "18081", *tls, "--data-dir", str(tmp_path / "srv"))
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.SECURITY
    assert_one_line_error(err)
    assert "for TLS" in err


def test_registry_serve_port_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """It said "registry API on http://127.0.0.1:99999" and kept running, listening nowhere."""
    args = ("registry", "serve", "--port", "99999", "--insecure", "--data-dir", str(tmp_path))
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert "not a TCP port" in err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--interval", "inf"], "--interval must be above 0"),  # OverflowError in the loop
        (["--interval", "nan"], "--interval must be above 0"),
        (["--channel", "../x"], "not a valid channel name"),
        (["--dir", "FILE"], "is a file"),  # was a FileExistsError traceback
    ],
)
def test_edge_agent_options(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    options: list[str],
    message: str,
) -> None:
    (tmp_path / "FILE").write_text("")
    options = [str(tmp_path / "FILE") if o == "FILE" else o for o in options]
    base = ["--server", "http://127.0.0.1:9", "--dir", str(tmp_path / "agent"), "--token", "t"]
    args = ("edge", "agent", *base, "--key", str(tmp_path / "k.pub"), *options)
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert message in err


@pytest.mark.parametrize("out", ["DIR", "DIR/afile/alice.token"])
def test_server_grant_out_is_checked_before_granting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, out: str
) -> None:
    """It granted, then crashed writing the token (IsADirectoryError): a token nobody saw."""
    from fedge.server.operators import list_users

    (tmp_path / "afile").write_text("")
    target = out.replace("DIR", str(tmp_path))
    args = ("server", "grant", "alice", "--out", target, "--data-dir", str(tmp_path / "srv"))
    code, err = fedge(monkeypatch, capsys, *args)
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert not list_users(tmp_path / "srv")


@pytest.mark.parametrize(
    "command", [("registry", "list"), ("registry", "device", "list"), ("fleet", "list")]
)
def test_registry_commands_with_a_file_as_data_dir(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    command: tuple[str, ...],
) -> None:
    """A NotADirectoryError traceback from the registry's mkdir."""
    (tmp_path / "afile").write_text("")
    code, err = fedge(monkeypatch, capsys, *command, "--data-dir", str(tmp_path / "afile"))
    assert code == ExitCode.REGISTRY
    assert_one_line_error(err)
    assert "cannot use" in err and "as the registry" in err


@pytest.mark.parametrize("case", ["same-port", "registry-port-taken", "data-dir-file"])
def test_server_start_refuses_before_starting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, case: str
) -> None:
    """The same port twice (or a taken registry port) started the SuperLink and reported
    success with the registry child dead; a file as --data-dir was a FileExistsError."""
    import socket

    from fedge.server.coordinator import stop_server

    data = tmp_path / "srv"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = {
            "same-port": ["--port", "18401", "--registry-port", "18401"],
            "registry-port-taken": [
                "--port",
                "18402",
                "--registry-port",
                str(taken.getsockname()[1]),
            ],
            "data-dir-file": [],
        }[case]
        if case == "data-dir-file":
            data.write_text("")
        args = ("server", "start", "--host", "127.0.0.1", *ports, "--insecure", "--data-dir")
        try:
            code, err = fedge(monkeypatch, capsys, *args, str(data))
        finally:
            if data.is_dir():
                stop_server(data)  # only if the refusal regressed and something started
    assert code == ExitCode.CONFIG
    assert_one_line_error(err)
    assert not (data.is_dir() and (data / "server.json").exists())
