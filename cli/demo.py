"""``fedge demo``: the whole pipeline on one machine (the work is in ``fedge.demo``)."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def demo(
    out: Annotated[Path, typer.Option(help="Work folder for everything the demo writes.")] = Path(
        "fedge-demo"
    ),
    clients: Annotated[int, typer.Option(help="Number of sites (SuperNodes).")] = 3,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 3,
    no_privacy: Annotated[
        bool, typer.Option("--no-privacy", help="Plain path: no TLS, SecAgg+ or DP.")
    ] = False,
) -> None:
    """Run the whole pipeline on this machine: pretrain, federate privately, export, deploy.

    Example: fedge demo --clients 3 --rounds 3
    """
    # Wide enough for the tables when the output goes to a file or a CI log.
    console = Console(width=None if sys.stdout.isatty() else 120)
    from fedge.demo.pipeline import DemoOptions, run_demo

    run_demo(DemoOptions(out, clients, rounds, not no_privacy), console)
