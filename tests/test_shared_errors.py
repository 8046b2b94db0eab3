"""Every exit code has a hint, and the CLI turns errors into one line and a non-zero exit."""

import subprocess
import sys

from fedge.shared import errors
from fedge.shared.errors import EXIT_CODE_HINT, ExitCode, FedgeError


def test_every_exit_code_has_a_hint() -> None:
    for code in ExitCode:
        assert code in EXIT_CODE_HINT
        if code is not ExitCode.OK:
            assert EXIT_CODE_HINT[code]


def test_every_error_class_has_its_own_nonzero_code() -> None:
    classes = [
        c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, FedgeError)
    ]
    codes = {c.exit_code for c in classes if c is not FedgeError}
    assert len(codes) == len(classes) - 1
    assert ExitCode.OK not in codes


def _fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_bad_input_is_one_line_not_a_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "run.toml"
    config.write_text('model = "gpt"\n')
    result = _fedge("run", "--config", str(config), "--insecure")
    assert result.returncode == int(ExitCode.CONFIG)
    assert "Traceback" not in result.stderr
    assert "unknown model 'gpt'" in result.stderr


def test_cli_unreachable_server(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fedge.shared.processes import free_port

    result = _fedge(
        "run", "--server", f"127.0.0.1:{free_port()}", "--insecure", "--out", str(tmp_path / "r")
    )
    assert result.returncode == int(ExitCode.CONNECTION)
    assert "cannot reach the server" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_data_folder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = _fedge(
        "client", "start", "--data", str(tmp_path / "nope"), "--insecure", "--server", "127.0.0.1:1"
    )
    assert result.returncode == int(ExitCode.DATA)
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
