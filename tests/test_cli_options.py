"""CLI help texts: rich never eats a part of one, and a shared option has one help text."""

import re
from typing import Any

# What rich reads as a markup tag (``[bold]``, ``[default: x]``) and drops from the help.
RICH_TAG = re.compile(r"\[[A-Za-z/@#][^\]]*\]")


def _leaves(command: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(fedge GROUP COMMAND, click command)`` for every leaf command of a click group."""
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return [(prefix, command)]
    return [leaf for name, sub in subcommands.items() for leaf in _leaves(sub, f"{prefix} {name}")]


def _commands() -> dict[str, Any]:
    from typer.main import get_command

    from fedge.cli import _register, app

    _register()
    return dict(_leaves(get_command(app), "fedge"))


def test_no_help_text_holds_what_rich_takes_for_markup() -> None:
    commands = _commands()
    assert "fedge run" in commands and "fedge registry device add" in commands
    eaten = [
        f"{path} {'/'.join(param.opts)}: {param.help!r}"
        for path, command in commands.items()
        for param in command.params
        if RICH_TAG.search(getattr(param, "help", None) or "")
    ]
    assert not eaten, f"write (default: ...) instead of [default: ...]: {eaten}"


def test_run_and_export_describe_the_connection_options_alike() -> None:
    commands = _commands()

    def helps(path: str) -> dict[str, str]:
        return {param.opts[0]: param.help for param in commands[path].params}

    run, export = helps("fedge run"), helps("fedge export")
    for option in ("--server", "--ca", "--insecure", "--token-file"):
        assert run[option] and run[option] == export[option], option
