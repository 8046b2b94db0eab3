"""``fedge server ...``: run the coordinator and manage which sites may join."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedge.shared.errors import ConfigError

app = typer.Typer(help="Run the federation server (Flower SuperLink) and enroll sites.")
DataDir = Annotated[
    Path | None, typer.Option(help="Server state: database, TLS files, site registry.")
]


def _data_dir(data_dir: Path | None) -> Path:
    from fedge.shared.paths import server_data_dir

    return (data_dir or server_data_dir()).expanduser().resolve()


def _local_superlink(data_dir: Path) -> tuple[str, Path | None]:
    """Address and CA of the SuperLink this data dir belongs to (from `server start`)."""
    import json

    info = data_dir / "server.json"
    if not info.is_file():
        raise ConfigError(
            f"no server was started with data dir {data_dir}; run `fedge server start`"
        )
    data = json.loads(info.read_text())
    ca = data.get("ca_cert")
    return str(data["address"]), Path(ca) if ca else None


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
    from fedge.server.superlink import SuperLinkSpec, start_superlink
    from fedge.shared.atomic import atomic_write_json
    from fedge.shared.tls import ensure_server_certificate

    console = Console()
    directory = _data_dir(data_dir)
    tls = None
    if insecure:
        console.print("[yellow]warning: --insecure: no TLS, and any SuperNode can join.")
    else:
        tls = ensure_server_certificate(directory / "tls", list(san or []))
    spec = SuperLinkSpec(directory, host, port, tls)
    proc = start_superlink(spec)
    address = f"{spec.connect_host}:{port}"
    registry_pid = None
    if registry_port:
        from fedge.server.registry.api import start_registry_server

        registry = start_registry_server(
            directory / "registry",
            host,
            registry_port,
            tls.cert if tls else None,
            tls.key if tls else None,
        )
        registry_pid = registry.pid
    atomic_write_json(
        directory / "server.json",
        {
            "address": address,
            "ca_cert": str(tls.ca_cert) if tls else None,
            "pid": proc.pid,
            "registry_pid": registry_pid,
        },
    )
    console.print(f"SuperLink running on {host}:{port} (pid {proc.pid}); log: {spec.log_path}")
    if registry_pid:
        scheme = "https" if tls else "http"
        console.print(f"registry and fleet API on {scheme}://{_public(host)}:{registry_port}")
    if tls is not None:
        console.print("TLS on, SuperNode authentication on. A site joins in three steps:")
        console.print(
            f"  site:     fedge client enroll --server {_public(host)}:{port} --name SITE"
        )
        console.print("  operator: fedge server approve SITE.enroll.json   (send the answer back)")
        console.print("  site:     fedge client start --name SITE --data SPEC")
    else:
        console.print(
            f"Sites connect with: fedge client start --server {_public(host)}:{port} "
            "--name SITE --data SPEC --insecure"
        )
    console.print("Submit runs with: fedge run --config run.toml")
    if foreground:
        from fedge.shared.processes import stay_attached

        stay_attached(proc)


def _public(host: str) -> str:
    import socket

    return socket.gethostname() if host in ("0.0.0.0", "::") else host


@app.command()
def stop(data_dir: DataDir = None) -> None:
    """Stop the SuperLink started with this data dir.

    Example: fedge server stop
    """
    from fedge.server.superlink import stop_superlink

    directory = _data_dir(data_dir)
    _stop_registry(directory)
    if stop_superlink(directory):
        typer.echo(f"stopped the SuperLink of {directory}")
    else:
        typer.echo(f"no SuperLink was running for {directory}")


def _stop_registry(directory: Path) -> None:
    import json

    from fedge.shared.processes import stop_process

    info = directory / "server.json"
    if info.is_file():
        pid = json.loads(info.read_text()).get("registry_pid")
        if pid:
            stop_process(int(pid))


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
