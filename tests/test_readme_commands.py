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


def test_every_cli_command_is_documented_with_an_example() -> None:
    import typer
    from typer.main import get_command

    from fedge.cli import _register, app

    _register()
    readme = _documentation()
    root = get_command(app)
    missing = []
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        subcommands = getattr(command, "commands", None)
        paths = [f"fedge {name} {sub}" for sub in subcommands] if subcommands else [f"fedge {name}"]
        missing += [path for path in paths if path not in readme]
    assert not missing, f"commands without an example in README.md or docs/: {missing}"
    assert isinstance(app, typer.Typer)


def test_ruff_is_clean() -> None:
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
