"""``fedge report``: write a run's self-contained HTML report (plots, sites, privacy, bundle)."""

from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (`fedge run --out`).")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write the HTML (default: RUN_DIR/report.html).")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="The bundle exported from the run (default: RUN_DIR/../bundle if any)."),
    ] = None,
) -> None:
    """Write one HTML file with the run's plots, per-site table, privacy record and bundle.

    Example: fedge report runs/exp1 --out exp1.html
    """
    from fedge.server.report.render import write_report

    path = write_report(run_dir, out, bundle)
    typer.echo(f"report: {path.as_uri()}")
