"""``fedge server grant / revoke-user / users``: who may control the federation."""

from pathlib import Path
from typing import Annotated

import typer

from fedge.cli.options import DataDir
from fedge.cli.options import data_dir_or_default as _data_dir


def grant(
    name: Annotated[str, typer.Argument(help="Who the credential is for.")],
    role: Annotated[str, typer.Option(help="operator (everything) or scientist (runs).")] = (
        "scientist"
    ),
    out: Annotated[
        Path | None, typer.Option(help="Write the token to this file (0600) instead of stdout.")
    ] = None,
    request: Annotated[
        Path | None, typer.Option(help="The scientist's NAME.access-request.json.")
    ] = None,
    fingerprint: Annotated[
        str | None, typer.Option(help="Key fingerprint the requester read out to you.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Grant a control-API credential; the token is shown (or written) once, never stored.

    With --request (from `fedge access request`) the token is sealed to the requester's
    key in NAME.access.json, which may travel by e-mail.

    Example: fedge server grant alice --request alice.access-request.json --fingerprint SHA256:...
    """
    from fedge.server.operators import grant as grant_user
    from fedge.shared.atomic import atomic_write_text

    directory = _data_dir(data_dir)
    if out is not None:
        _check_token_destination(out)  # before granting: a token nobody can read is lost
    if request is not None:
        _grant_sealed(directory, name, role, request, fingerprint, out)
        return
    given = grant_user(directory, name, role)
    if out is not None:
        atomic_write_text(out, given.token + "\n", mode=0o600)
        typer.echo(f"granted {given.role} {given.name}; token written to {out} (mode 0600)")
    else:
        typer.echo(f"granted {given.role} {given.name}; token (shown once):")
        typer.echo(given.token)
    typer.echo(f"token fingerprint {given.fingerprint}: read it out when you hand it over")
    typer.echo("use it with: fedge run --token-file FILE --server HOST:PORT --ca ca.crt")


def _check_token_destination(out: Path) -> None:
    """Refuse an --out that is a directory or whose folder cannot be made."""
    from fedge.shared.errors import ConfigError

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as alice.token")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot make its folder: {e.strerror}") from e


def _grant_sealed(
    directory: Path, name: str, role: str, request: Path, fingerprint: str | None, out: Path | None
) -> None:
    """Check the request and its read-out fingerprint, grant, seal the token to its key."""
    from fedge.server.operators import grant as grant_user
    from fedge.shared.access_files import read_access_request, write_access_answer
    from fedge.shared.enrollment_files import same_fingerprint
    from fedge.shared.errors import ConfigError, SecurityError

    asked = read_access_request(request)
    if asked.name != name:
        raise ConfigError(f"{request} asks access for {asked.name!r}, not {name!r}")
    if fingerprint is None:
        raise ConfigError("pass --fingerprint: the key fingerprint the requester read out")
    if not same_fingerprint(fingerprint, asked.fingerprint):
        raise SecurityError(f"{request}: key fingerprint {asked.fingerprint} is not {fingerprint}")
    ca = directory / "tls" / "ca.crt"
    if not ca.is_file():
        raise ConfigError(f"no CA in {directory}; start the server with TLS first")
    given = grant_user(directory, name, role)
    answer = out or request.with_name(f"{name}.access.json")
    ca_fingerprint = write_access_answer(asked, role, given.token, ca.read_bytes(), answer)
    typer.echo(f"granted {role} {name}; send {answer} back (only {name}'s key opens the token)")
    typer.echo(f"read out the CA fingerprint: {ca_fingerprint}")


def revoke_user(
    name: Annotated[str, typer.Argument(help="The user to remove.")], data_dir: DataDir = None
) -> None:
    """Revoke a control-API credential; the front refuses it from the next request.

    Example: fedge server revoke-user alice
    """
    from fedge.server.operators import revoke_user as revoke

    revoke(_data_dir(data_dir), name)
    typer.echo(f"revoked {name}")


def users(data_dir: DataDir = None) -> None:
    """List who may use the control API (name, role, token fingerprint, granted at).

    Example: fedge server users
    """
    from rich.console import Console
    from rich.table import Table

    from fedge.server.operators import list_users

    table = Table(title="control-API users")
    for column in ("name", "role", "token fingerprint", "granted"):
        table.add_column(column)
    for row in list_users(_data_dir(data_dir)):
        table.add_row(row.name, row.role, row.fingerprint, row.granted_at)
    Console().print(table)


def register(server_app: typer.Typer) -> None:
    """Attach these commands to the ``fedge server`` group."""
    server_app.command()(grant)
    server_app.command(name="revoke-user")(revoke_user)
    server_app.command()(users)
