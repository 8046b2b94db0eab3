"""The ``fedge`` command: parses arguments, calls the library, renders the result.

Each command group lives beside the code it drives (``fedge.server.cli``,
``fedge.client.cli``, ``fedge.edge.build.cli``, ``fedge.edge.device.cli``, ...);
heavy imports (torch, flwr) happen inside the commands that need them, so that
``fedge edge ...`` runs on a device that has neither. Only this layer turns a
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
    from fedge.client.cli import app as client_app
    from fedge.demo.pipeline import demo
    from fedge.edge.build.cli import export, keys_app
    from fedge.edge.device.cli import app as edge_app
    from fedge.edge.device.deploy_cli import register as register_deploy_commands
    from fedge.server.cli import app as server_app
    from fedge.server.registry_cli import fleet_app, registry_app
    from fedge.server.run_cli import run

    app.add_typer(server_app, name="server")
    app.add_typer(client_app, name="client")
    app.command()(run)
    app.command()(demo)
    app.command()(export)
    app.add_typer(keys_app, name="keys")
    register_deploy_commands(edge_app)
    app.add_typer(edge_app, name="edge")
    app.add_typer(registry_app, name="registry")
    app.add_typer(fleet_app, name="fleet")


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
