"""``fedge client policy / privacy``: a site's own privacy policy and its ledger."""

import math
from pathlib import Path
from typing import Annotated

import typer

SiteName = Annotated[str, typer.Option(help="This site's enrolled name.")]


def _folder(name: str) -> Path:
    from fedge.shared.enrollment_files import validate_site_name
    from fedge.shared.paths import site_dir

    return site_dir(validate_site_name(name))


def policy(
    name: SiteName = "site",
    require: Annotated[
        list[str] | None, typer.Option(help="Accepted DP level: none, record, site (repeatable).")
    ] = None,
    min_noise_multiplier: Annotated[
        float | None, typer.Option(help="Least noise accepted.")
    ] = None,
    max_epsilon_per_run: Annotated[
        float | None, typer.Option(help="Largest epsilon of one run (0: no limit).")
    ] = None,
    lifetime_epsilon: Annotated[
        float | None, typer.Option(help="This site's total epsilon over all runs (0: no limit).")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="The delta the budget is stated at.")] = None,
    require_secagg: Annotated[
        bool | None, typer.Option("--require-secagg/--no-require-secagg", help="Only SecAgg+.")
    ] = None,
    task: Annotated[list[str] | None, typer.Option(help="Accepted task (repeatable).")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Accepted model (repeatable).")] = None,
) -> None:
    """Show or change this site's privacy policy (enforced by the site on every round).

    Example: fedge client policy --name hospital-a --require record --lifetime-epsilon 8
    """
    from fedge.client.policy import POLICY_NAME, update_policy

    path = _folder(name) / POLICY_NAME
    updated = update_policy(
        path,
        require=tuple(require) if require else None,
        min_noise_multiplier=min_noise_multiplier,
        max_epsilon_per_run=max_epsilon_per_run,
        lifetime_epsilon=lifetime_epsilon,
        delta=delta,
        require_secagg=require_secagg,
        tasks=tuple(task) if task else None,
        models=tuple(model) if model else None,
    )
    typer.echo(f"# {path}")
    typer.echo(updated.to_toml(), nl=False)


def _eps(value: float) -> str:
    return "inf" if not math.isfinite(value) else f"{value:.3f}"


def privacy(name: SiteName = "site") -> None:
    """Print this site's privacy ledger: runs, epsilon per run, total, what remains.

    Example: fedge client privacy --name hospital-a
    """
    from rich.console import Console
    from rich.table import Table

    from fedge.client.ledger import LEDGER_NAME
    from fedge.client.policy import POLICY_NAME, load_policy, report

    folder = _folder(name)
    ledger = report(load_policy(folder / POLICY_NAME), folder / LEDGER_NAME)
    table = Table(title=f"privacy ledger of {name} (delta {ledger.policy.delta:g})")
    for column in ("run", "dp", "rounds", "evaluations", "epsilon"):
        table.add_column(column)
    for row in ledger.runs:
        table.add_row(row.run_id, row.dp, str(row.rounds), str(row.evaluations), _eps(row.epsilon))
    console = Console()
    console.print(table)
    console.print(f"total epsilon (RDP composition over all runs): {_eps(ledger.total)}")
    if ledger.remaining is None:
        console.print("lifetime budget: none set (fedge client policy --lifetime-epsilon E)")
    else:
        budget = ledger.policy.lifetime_epsilon
        console.print(f"lifetime budget {budget:g}: {_eps(ledger.remaining)} remains")


def register(client_app: typer.Typer) -> None:
    """Attach these commands to the ``fedge client`` group."""
    client_app.command()(policy)
    client_app.command()(privacy)
