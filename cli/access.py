"""``fedge access request / install``: a data scientist asks for, and installs, run access."""

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Ask the operator for a control credential (to submit runs).")
Folder = Annotated[Path | None, typer.Option(help="Where keys and tokens live (0700).")]


def _folder(folder: Path | None) -> Path:
    from fedge.shared.paths import fedge_home

    return (folder or fedge_home() / "access").expanduser().resolve()


@app.command()
def request(
    name: Annotated[str, typer.Option(help="Your user name, as the operator will grant it.")],
    server: Annotated[str, typer.Option(help="The server, HOST:PORT.")],
    folder: Folder = None,
) -> None:
    """Make a key pair and an access request to send to the operator.

    Example: fedge access request --name alice --server fl.example.org:9092
    """
    from fedge.shared.access_files import create_access_request

    made = create_access_request(name, server, _folder(folder))
    typer.echo(f"send {made.path} to the operator and read out your key fingerprint:")
    typer.echo(f"  {made.fingerprint}")


@app.command()
def install(
    answer: Annotated[Path, typer.Argument(help="The operator's NAME.access.json.")],
    ca_fingerprint: Annotated[
        str, typer.Option(help="The CA fingerprint the operator read out to you.")
    ],
    folder: Folder = None,
) -> None:
    """Check the operator's answer and store your token (0600) and the server's CA.

    Example: fedge access install alice.access.json --ca-fingerprint SHA256:AB:CD:...
    """
    from fedge.shared.access_files import install_access

    done = install_access(answer, ca_fingerprint, _folder(folder))
    typer.echo(f"installed {done.role} access for {done.name} to {done.server_address}")
    typer.echo(
        f"submit runs with: fedge run --config run.toml --server {done.server_address} "
        f"--ca {done.ca_path} --token-file {done.token_path}"
    )
