"""The ``fedge`` command: parses arguments, calls the library, renders the result.

One module per command group (``server``, ``client``, ``run``, ``demo``, ``export``,
``edge`` + ``deploy``, ``registry``), each a thin layer over the library function it
calls. Heavy imports (torch, flwr) happen inside the commands that need them, so that
``fedge edge ...`` runs on a device that has neither. Only ``main`` here turns a
``FedgeError`` into a one-line message and a non-zero exit code.
"""

import logging
import sys

import typer

from fedge.shared.errors import ExitCode, FedgeError

app = typer.Typer(
    name="fedge",
    help="Federated fine-tuning with privacy, and signed deployment to edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    """Attach every command group; each module keeps its heavy imports inside commands."""
    from fedge.cli.access import app as access_app
    from fedge.cli.bundle import app as bundle_app
    from fedge.cli.client import app as client_app
    from fedge.cli.demo import demo
    from fedge.cli.deploy import register as register_deploy_commands
    from fedge.cli.edge import app as edge_app
    from fedge.cli.export import export, keys_app, validate
    from fedge.cli.operators import register as register_operator_commands
    from fedge.cli.registry import fleet_app, registry_app
    from fedge.cli.report import report
    from fedge.cli.run import run
    from fedge.cli.server import app as server_app
    from fedge.cli.site_privacy import register as register_site_privacy_commands

    register_operator_commands(server_app)
    app.add_typer(server_app, name="server")
    register_site_privacy_commands(client_app)
    app.add_typer(client_app, name="client")
    app.command()(run)
    app.command()(demo)
    app.command()(report)
    app.command()(export)
    app.command()(validate)
    app.add_typer(keys_app, name="keys")
    register_deploy_commands(edge_app)
    app.add_typer(edge_app, name="edge")
    app.add_typer(registry_app, name="registry")
    app.add_typer(access_app, name="access")
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(bundle_app, name="bundle")


def main() -> None:
    """Entry point of the ``fedge`` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _register()
    try:
        app()
    except FedgeError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        if e.hint:
            typer.echo(f"hint: {e.hint}", err=True)
        sys.exit(int(e.exit_code))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
