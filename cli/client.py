"""``fedge client ...``: enroll this site and serve its data to the federation."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedge.cli.options import Insecure

app = typer.Typer(help="Enroll a data-holding site and run its SuperNode.")


@app.command()
def enroll(
    server: Annotated[str, typer.Option(help="The server, HOST:PORT.")] = "",
    name: Annotated[str, typer.Option(help="This site's name, unique in the federation.")] = "",
    accept: Annotated[
        Path | None, typer.Option(help="Install the operator's SITE.approved.json.")
    ] = None,
    ca_fingerprint: Annotated[
        str | None, typer.Option(help="CA fingerprint the operator read out (with --accept).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace this site's existing key pair.")] = False,
) -> None:
    """Create this site's key pair and enrollment request, or install the approval.

    Example: fedge client enroll --server fl.example.org:9092 --name hospital-a
    """
    from fedge.client.enrollment import create_enrollment, install_approval
    from fedge.shared.errors import ConfigError

    if accept is not None:
        if ca_fingerprint is None:
            from fedge.shared.enrollment_files import read_approval

            offered = read_approval(accept).ca_fingerprint
            typer.confirm(
                f"Does CA fingerprint {offered} match what the operator read out?", abort=True
            )
            ca_fingerprint = offered
        identity = install_approval(accept, ca_fingerprint)
        typer.echo(f"{identity.site} approved; CA fingerprint {identity.ca_fingerprint}")
        typer.echo(f"start it: fedge client start --name {identity.site} --data SPEC")
        return
    if not server or not name:
        raise ConfigError("enroll needs --server HOST:PORT and --name SITE (or --accept FILE)")
    request = create_enrollment(name, server, force=force)
    typer.echo(
        f"key pair created; the private key stays in {request.path.parent if request.path else '?'}"
    )
    typer.echo(f"send {request.path} to the server operator; key fingerprint {request.fingerprint}")
    typer.echo(f"then: fedge client enroll --accept {name}.approved.json")


@app.command()
def start(
    data: Annotated[str, typer.Option(help="This site's data: digits#0/3, a folder, a .csv.")],
    name: Annotated[str, typer.Option(help="This site's enrolled name.")] = "site",
    server: Annotated[str | None, typer.Option(help="The server, HOST:PORT.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="A run config to check the data against before joining.")
    ] = None,
    insecure: Insecure = False,
    foreground: Annotated[bool, typer.Option(help="Stay attached (containers, systemd).")] = False,
    policy: Annotated[
        Path | None, typer.Option(help="Privacy policy (TOML); default: the site's policy.toml.")
    ] = None,
) -> None:
    """Start this site's SuperNode: it trains on the data, which never leaves the site.

    Example: fedge client start --name hospital-a --data /data/xrays --server fl.example.org:9092
    """
    from fedge.client.site_checks import check_data, check_server
    from fedge.client.supernode import SuperNodeSpec, start_supernode
    from fedge.shared.atomic import atomic_write_text
    from fedge.shared.paths import site_dir

    console = Console()
    check_data(data, config)
    key = ca = None
    if not insecure:
        from fedge.client.enrollment import load_site_identity

        identity = load_site_identity(name)
        server = server or identity.server_address
        key, ca = identity.private_key_path, identity.ca_cert_path
        if ca is None:
            from fedge.client.enrollment import find_approval
            from fedge.shared.errors import SecurityError

            found = find_approval(name)
            approval = str(found) if found else f"{name}.approved.json"
            raise SecurityError(
                f"site {name} is not approved yet; check the CA fingerprint with the operator, "
                f"then install the approval: fedge client enroll --accept {approval}"
            )
    if not server:
        from fedge.shared.errors import ConfigError

        raise ConfigError("no server: pass --server HOST:PORT")
    check_server(server)
    folder = site_dir(name)
    from fedge.client.ledger import LEDGER_NAME
    from fedge.client.policy import POLICY_NAME, load_policy

    policy_path = policy or folder / POLICY_NAME
    if policy is not None and not policy.is_file():
        from fedge.shared.errors import ConfigError

        raise ConfigError(f"policy file {policy} does not exist")
    load_policy(policy_path)  # a broken policy stops the start, not a round later
    spec = SuperNodeSpec(
        server, name, data, folder / "logs", ca, key, policy=policy_path,
        ledger=folder / LEDGER_NAME,
    )  # fmt: skip
    proc = start_supernode(spec)
    atomic_write_text(folder / "supernode.pid", f"{proc.pid}\n")
    console.print(f"site {name} joined {server} (pid {proc.pid}); data {data}; log {spec.log_path}")
    if foreground:
        from fedge.shared.processes import stay_attached

        stay_attached(proc)


@app.command()
def stop(name: Annotated[str, typer.Option(help="This site's name.")] = "site") -> None:
    """Stop this site's SuperNode.

    Example: fedge client stop --name hospital-a
    """
    from fedge.shared.paths import site_dir
    from fedge.shared.processes import stop_process

    pid_file = site_dir(name) / "supernode.pid"
    if not pid_file.exists():
        typer.echo(f"site {name} is not running")
        return
    stop_process(int(pid_file.read_text().strip()))
    pid_file.unlink(missing_ok=True)
    typer.echo(f"stopped site {name}")
