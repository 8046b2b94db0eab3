"""The README's two set-up commands stay what CI runs, and every CLI command is documented."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _documentation() -> str:
    """The README and every page under docs/: where a command's example may live."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return "\n".join(page.read_text(encoding="utf-8") for page in pages if page.is_file())


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.MULTILINE)
    assert command is not None
    assert f"```bash\n{command.group(1)}\n```" in _readme()


def test_readme_has_exactly_two_setup_commands() -> None:
    setup = _readme().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", setup, re.DOTALL)
    assert len(blocks) == 2
    assert blocks[0].endswith("fedge demo") and blocks[1].endswith("python -m pytest")


def _example_lines(text: str) -> list[str]:
    """Every line inside a fenced code block, without a leading ``$ `` prompt."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
    return [line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()]


def _command_paths(command: object, prefix: str) -> list[str]:
    """``fedge GROUP [SUBGROUP] COMMAND`` for every leaf command of a click group."""
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return [prefix]
    return [
        path
        for name, sub in subcommands.items()
        for path in _command_paths(sub, f"{prefix} {name}")
    ]


def _undocumented(paths: list[str], text: str) -> list[str]:
    lines = _example_lines(text)
    return [p for p in paths if not any(line == p or line.startswith(p + " ") for line in lines)]


def test_every_cli_command_is_documented_with_an_example() -> None:
    from typer.main import get_command

    from fedge.cli import _register, app

    _register()
    paths = _command_paths(get_command(app), "fedge")
    assert "fedge server start" in paths and "fedge registry device add" in paths
    missing = _undocumented(paths, _documentation())
    assert not missing, (
        f"commands without an example in a code block of README.md or docs/: {missing}"
    )


def test_a_mention_in_prose_is_not_an_example() -> None:
    text = "Run `fedge server start` first.\n\n```bash\nfedge server stopper\n```\n"
    assert _undocumented(["fedge server start", "fedge server stop"], text) == [
        "fedge server start",
        "fedge server stop",
    ]
    assert (
        _undocumented(["fedge server stop"], "```bash\n$ fedge server stop --data-dir d\n```") == []
    )


def test_ruff_is_clean() -> None:
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
