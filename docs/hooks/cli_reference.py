"""MkDocs hook: render ``--help`` of every ``fedge`` command into cli.md, so it cannot drift.

The page holds a marker line; at build time it is replaced by one section per
command, with the help text the installed ``fedge`` prints.
"""

from typing import Any

MARKER = "<!-- cli-reference -->"


def _commands() -> list[tuple[list[str], Any]]:
    """(path, click command) of every leaf command and group, depth first, in help order."""
    from typer.main import get_command

    from fedge.cli import _register, app

    _register()
    root = get_command(app)
    out: list[tuple[list[str], Any]] = []

    def walk(path: list[str], command: Any) -> None:
        out.append((path, command))
        for name in getattr(command, "commands", {}) or {}:
            walk([*path, name], command.commands[name])

    walk([], root)
    return out


def _help(path: list[str]) -> str:
    import typer.core
    from typer.testing import CliRunner

    from fedge.cli import app

    # Click's plain formatter: Rich's boxes and padding make poor Markdown.
    rich, typer.core.HAS_RICH = typer.core.HAS_RICH, False
    try:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    finally:
        typer.core.HAS_RICH = rich
    if result.exit_code != 0:
        raise RuntimeError(f"fedge {' '.join(path)} --help failed: {result.output}")
    return "\n".join(line.rstrip() for line in result.output.strip().splitlines())


def render() -> str:
    """The CLI reference as Markdown."""
    parts = []
    for path, _command in _commands():
        title = " ".join(["fedge", *path])
        parts.append(f"## `{title}`\n\n```text\n{_help(path)}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the marker in cli.md with the rendered reference."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
