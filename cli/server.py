"""``fedge server ...``: run the coordinator and manage which sites may join."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedge.cli.options import DataDir
from fedge.cli.options import data_dir_or_default as _data_dir

app = typer.Typer(help="Run the federation server (Flower SuperLink) and enroll sites.")


def _local_superlink(data_dir: Path) -> tuple[str, Path | None]:
    """Address and CA of the SuperLink this data dir belongs to (from `server start`)."""
    from fedge.server.coordinator import read_state

    state = read_state(data_dir)
    # Operator commands on this machine reach the SuperLink on loopback, past the front.
    return state.local_control, state.ca_path


@app.command()
def start(
    port: Annotated[int, typer.Option(help="Port of the SuperLink (sites and runs).")] = 9092,
    registry_port: Annotated[
        int, typer.Option(help="Port of the model registry / fleet API for devices (0: off).")
    ] = 9443,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    data_dir: DataDir = None,
    san: Annotated[
        list[str] | None, typer.Option(help="Extra host name or IP sites dial (repeatable).")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="No TLS and no site authentication.")] = False,
    foreground: Annotated[bool, typer.Option(help="Stay attached (containers, systemd).")] = False,
) -> None:
    """Start the SuperLink: TLS and enrolled sites only, state on disk, telemetry off.

    Example: fedge server start --port 9092 --san fl.example.org
    """
    from fedge.server.coordinator import public_host, start_server

    console = Console()
    if insecure:
        console.print("[yellow]warning: --insecure: no TLS, and any SuperNode can join.")
        console.print("[yellow]warning: --insecure: the control API is open to anyone.")
    started = start_server(_data_dir(data_dir), host, port, registry_port, san, insecure)
    state, public = started.state, public_host(host)
    if state.control_address is None:
        console.print(
            f"SuperLink running on {host}:{port} (pid {state.pid}); log: {started.log_path}"
        )
    else:
        console.print(
            f"SuperLink on {state.control_address} (loopback only, pid {state.pid}); "
            f"log: {started.log_path}"
        )
        console.print(f"fedge front on {host}:{port} (pid {state.front_pid}): sites and runs")
    if started.registry_url:
        console.print(f"registry and fleet API on {started.registry_url}")
        console.print(
            f"web console on {started.registry_url}/console/ (log in with an operator token: "
            "fedge server grant NAME --role operator)"
        )
    if started.tls:
        console.print("TLS on, SuperNode authentication on. A site joins in three steps:")
        console.print(f"  site:     fedge client enroll --server {public}:{port} --name SITE")
        console.print("  operator: fedge server approve SITE.enroll.json   (send the answer back)")
        console.print("  site:     fedge client start --name SITE --data SPEC")
    else:
        console.print(
            f"Sites connect with: fedge client start --server {public}:{port} "
            "--name SITE --data SPEC --insecure"
        )
    if started.tls:
        from fedge.server.operators import list_users

        console.print(f"Control API (runs, nodes) on {public}:{port} needs a credential.")
        if not any(u.role == "operator" for u in list_users(_data_dir(data_dir))):
            console.print("  get yours (shown once): fedge server grant admin --role operator")
        console.print("  then:  fedge run --config run.toml --token-file admin.token")
    else:
        console.print("Submit runs with: fedge run --config run.toml")
    if foreground:
        from fedge.shared.processes import stay_attached

        others = [p for p in (started.registry, started.front) if p is not None]
        stay_attached(started.superlink, *others)


@app.command()
def stop(data_dir: DataDir = None) -> None:
    """Stop the SuperLink (and registry API) started with this data dir.

    Example: fedge server stop
    """
    from fedge.server.coordinator import stop_server

    directory = _data_dir(data_dir)
    if stop_server(directory):
        typer.echo(f"stopped the SuperLink of {directory}")
    else:
        typer.echo(f"no SuperLink was running for {directory}")


@app.command()
def approve(
    request: Annotated[Path, typer.Argument(help="The site's SITE.enroll.json.")],
    fingerprint: Annotated[
        str | None, typer.Option(help="Key fingerprint the site admin read out to you.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Register a site's public key with the SuperLink and write its approval file.

    Example: fedge server approve hospital-a.enroll.json --fingerprint SHA256:...
    """
    from fedge.server.enrollment import approve as approve_site

    directory = _data_dir(data_dir)
    address, ca = _local_superlink(directory)
    site = approve_site(request, directory, address, ca, expected_fingerprint=fingerprint)
    for warning in site.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)
    typer.echo(f"approved {site.name} (key {site.fingerprint}, node {site.node_id})")
    typer.echo(f"send {site.approval_path} back to the site; CA fingerprint {site.ca_fingerprint}")


@app.command()
def clients(data_dir: DataDir = None) -> None:
    """List enrolled sites: name, fingerprint, status, last seen.

    Example: fedge server clients
    """
    from fedge.server.enrollment import list_sites

    directory = _data_dir(data_dir)
    address, ca = _local_superlink(directory)
    table = Table(title=f"sites of {address}")
    for column in ("site", "fingerprint", "status", "node", "last seen"):
        table.add_column(column)
    for row in list_sites(directory, address, ca):
        seen = row.last_seen.isoformat(timespec="seconds") if row.last_seen else "-"
        table.add_row(
            row.name or "(not enrolled)", row.fingerprint, row.status, str(row.node_id or "-"), seen
        )
    Console().print(table)


@app.command()
def revoke(
    site: Annotated[str, typer.Argument(help="The site's name.")], data_dir: DataDir = None
) -> None:
    """Revoke a site: its SuperNode is disconnected and its key can never join again.

    Example: fedge server revoke hospital-a
    """
    from fedge.server.enrollment import revoke as revoke_site

    directory = _data_dir(data_dir)
    address, ca = _local_superlink(directory)
    row = revoke_site(site, directory, address, ca)
    typer.echo(f"revoked {row.name} (key {row.fingerprint})")
