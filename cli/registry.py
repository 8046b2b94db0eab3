"""``fedge registry ...`` and ``fedge fleet ...``: typer commands over the registry package.

Operator commands read and write the registry's SQLite directly (on the server
machine), so they need no network credential; devices use the HTTPS API.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedge.cli.options import DataDir

if TYPE_CHECKING:
    from fedge.server.registry.fleet import DeviceView

console = Console()

registry_app = typer.Typer(
    help="Model registry: publish signed bundles, move channels, enroll devices, serve the API.",
    no_args_is_help=True,
)
device_app = typer.Typer(
    help="Enroll and revoke edge devices (bearer tokens).", no_args_is_help=True
)
registry_app.add_typer(device_app, name="device")
fleet_app = typer.Typer(help="What the enrolled edge devices report.", no_args_is_help=True)


SigningKey = Annotated[
    Path | None,
    typer.Option(
        "--signing-key",
        help="Operator key that signs channel statements (default: FEDGE_HOME/keys/signing.key).",
    ),
]


def _registry_dir(data_dir: Path | None) -> Path:
    from fedge.server.registry.publish import REGISTRY_SUBDIR, default_registry_dir

    return data_dir / REGISTRY_SUBDIR if data_dir is not None else default_registry_dir()


@registry_app.command()
def publish(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (or its .tar).")],
    channel: Annotated[
        str | None, typer.Option(help="Point this channel at it: canary, stable or any name.")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="Signing public key (default: FEDGE_HOME/keys/signing.pub).")
    ] = None,
    signing_key: SigningKey = None,
    data_dir: DataDir = None,
) -> None:
    """Verify a signed bundle and store it as an immutable version."""
    from fedge.server.registry.publish import default_public_key, publish_bundle
    from fedge.server.registry.store import Registry

    registry = Registry(_registry_dir(data_dir), signing_key)
    with console.status(f"verifying and storing {bundle} ..."):
        record, created = publish_bundle(registry, bundle, key or default_public_key(), channel)
    what = "published" if created else "already published (same content)"
    on = f" on channel [bold]{channel}[/]" if channel else ""
    console.print(f"[green]{what}[/] version [bold]{record.version}[/] ({record.bundle_id}){on}")


@registry_app.command("list")
def list_versions(data_dir: DataDir = None) -> None:
    """Show every version and the channels pointing at it."""
    from fedge.server.registry.store import Registry

    table = Table("version", "bundle", "task", "artifacts", "size", "published", "channels")
    for r in Registry(_registry_dir(data_dir)).list_versions():
        table.add_row(
            r.version,
            r.bundle_id,
            r.task,
            "\n".join(r.artifacts),
            f"{r.tar_size / 1e6:.2f} MB",
            r.published_at,
            ", ".join(r.channels) or "-",
        )
    console.print(table)


@registry_app.command()
def promote(
    version: Annotated[str, typer.Argument(help="A published version.")],
    channel: Annotated[str, typer.Option(help="Channel to point at VERSION.")] = "stable",
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Sign it as a deliberate downgrade.")
    ] = False,
    signing_key: SigningKey = None,
    data_dir: DataDir = None,
) -> None:
    """Point a channel at a published version (devices on it update on their next poll)."""
    from fedge.server.registry.store import Registry

    changed = Registry(_registry_dir(data_dir), signing_key).promote(version, channel, rollback)
    state = "now points at" if changed else "already pointed at"
    console.print(f"channel [bold]{channel}[/] {state} [bold]{version}[/]")


@registry_app.command()
def rollback(
    channel: Annotated[
        str, typer.Option(help="Channel to return to its previous version.")
    ] = "stable",
    signing_key: SigningKey = None,
    data_dir: DataDir = None,
) -> None:
    """Return a channel to the version it had before (a signed rollback; history is kept)."""
    from fedge.server.registry.store import Registry

    old, new = Registry(_registry_dir(data_dir), signing_key).rollback(channel)
    console.print(f"channel [bold]{channel}[/] rolled back: {old} -> [bold]{new}[/]")


@registry_app.command()
def refresh(
    channel: Annotated[str, typer.Option(help="Channel whose statement to sign again.")] = "stable",
    days: Annotated[float, typer.Option(min=0.01, help="Days the new statement is valid.")] = 30.0,
    signing_key: SigningKey = None,
    data_dir: DataDir = None,
) -> None:
    """Sign a channel's statement again with a new expiry (run it well before it expires)."""
    from fedge.server.registry.store import Registry

    statement = Registry(_registry_dir(data_dir), signing_key, days).refresh(channel)
    console.print(
        f"channel [bold]{channel}[/] -> {statement.version} signed again "
        f"(sequence {statement.sequence}, expires {statement.expires_at})"
    )


@registry_app.command()
def history(
    channel: Annotated[str | None, typer.Option(help="Only this channel.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Show every channel assignment, rolled-back ones included."""
    from fedge.server.registry.store import Registry

    table = Table("at", "channel", "version", "action", "rolled back at")
    for e in Registry(_registry_dir(data_dir)).history(channel):
        table.add_row(e.at, e.channel, e.version, e.action, e.rolled_back_at or "")
    console.print(table)


@registry_app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 9443,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option(help="Plain HTTP (testing only).")] = False,
    data_dir: DataDir = None,
) -> None:
    """Serve the device API (HTTPS; the server's CA-issued certificate by default)."""
    from fedge.server.registry.api import resolve_tls, run_registry_server
    from fedge.shared.listen import check_listen_address

    check_listen_address(host, port)
    tls = resolve_tls(tls_cert, tls_key, insecure)
    if tls is None:
        console.print("[yellow]warning: --insecure: tokens and bundles travel unencrypted[/]")
    scheme = "http" if tls is None else "https"
    console.print(f"registry API on {scheme}://{host}:{port} (OpenAPI: /openapi.json)")
    run_registry_server(_registry_dir(data_dir), host, port, tls)


@device_app.command("add")
def device_add(
    name: Annotated[str, typer.Argument(help="Device name (unique).")],
    token_file: Annotated[
        Path | None, typer.Option(help="Write the token here (mode 0600) instead of printing it.")
    ] = None,
    channel: Annotated[
        list[str] | None,
        typer.Option("--channel", help="A channel it may follow (repeat; default: stable)."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Enroll a device; its token is shown once and stored only as a hash."""
    from fedge.server.registry.devices import DeviceStore

    token = DeviceStore(_registry_dir(data_dir)).add(name, tuple(channel or ["stable"]))
    _hand_over_token(name, token, token_file)


@device_app.command("rotate")
def device_rotate(
    name: Annotated[str, typer.Argument(help="Device name.")],
    token_file: Annotated[Path | None, typer.Option(help="Write the token here (0600).")] = None,
    data_dir: DataDir = None,
) -> None:
    """Give a device a new token; the old one stops working immediately."""
    from fedge.server.registry.devices import DeviceStore

    token = DeviceStore(_registry_dir(data_dir)).rotate(name)
    _hand_over_token(name, token, token_file)


@device_app.command("channels")
def device_channels(
    name: Annotated[str, typer.Argument(help="Device name.")],
    channel: Annotated[
        list[str], typer.Option("--channel", help="A channel it may follow (repeat).")
    ],
    data_dir: DataDir = None,
) -> None:
    """Set the channels a device may follow (and download the versions of)."""
    from fedge.server.registry.devices import DeviceStore

    allowed = DeviceStore(_registry_dir(data_dir)).set_channels(name, tuple(channel))
    console.print(f"device [bold]{name}[/] may follow: {', '.join(allowed)}")


@device_app.command("revoke")
def device_revoke(
    name: Annotated[str, typer.Argument(help="Device name.")], data_dir: DataDir = None
) -> None:
    """Revoke a device: its calls are refused (403) from now on."""
    from fedge.server.registry.devices import DeviceStore

    changed = DeviceStore(_registry_dir(data_dir)).revoke(name)
    console.print(f"device [bold]{name}[/] {'revoked' if changed else 'was already revoked'}")


@device_app.command("list")
def device_list(data_dir: DataDir = None) -> None:
    """Show enrolled devices (never their tokens)."""
    from fedge.server.registry.devices import DeviceStore

    table = Table("device", "channels", "enrolled", "revoked")
    for d in DeviceStore(_registry_dir(data_dir)).list():
        table.add_row(d.name, ", ".join(d.channels), d.created_at, d.revoked_at or "")
    console.print(table)


def _hand_over_token(name: str, token: str, token_file: Path | None) -> None:
    if token_file is not None:
        from fedge.shared.atomic import atomic_write_text

        atomic_write_text(token_file, token + "\n", mode=0o600)
        console.print(f"device [bold]{name}[/]: token written to {token_file} (mode 0600)")
        return
    console.print(f"device [bold]{name}[/] enrolled. Its token (shown only this once):")
    typer.echo(token)


def _safe(value: object) -> Text:
    """What a device reported, as plain text: no markup, control characters escaped."""
    from fedge.shared.fleet_protocol import printable

    return Text("-" if value is None else printable(str(value)))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fleet_table(views: "list[DeviceView]") -> Table:
    """The rich table ``fedge fleet list`` prints (the demo prints it too)."""
    table = Table(
        "device",
        "state",
        "channel",
        "active",
        "artifact",
        "health",
        "last seen",
        "p50 ms",
        "p99 ms",
    )
    for v in views:
        ago = v.seen_ago_s()
        table.add_row(
            v.name,
            v.state,
            _safe(v.channel),
            _safe(v.active_version),
            _safe(v.detail.get("artifact")),
            _safe(v.health),
            "never" if ago is None else f"{ago:.0f}s ago",
            _ms(v.latency_p50_ms),
            _ms(v.latency_p99_ms),
        )
    return table


@fleet_app.command("list")
def fleet_list(data_dir: DataDir = None) -> None:
    """Every device: channel, active version, health, last seen, p50/p99 latency."""
    from fedge.server.registry.fleet import fleet

    console.print(fleet_table(fleet(_registry_dir(data_dir))))


@fleet_app.command("show")
def fleet_show(
    device: Annotated[str, typer.Argument(help="Device name.")], data_dir: DataDir = None
) -> None:
    """Everything a device last reported."""
    from fedge.server.registry.fleet import device_view

    view = device_view(_registry_dir(data_dir), device)
    table = Table("field", "value", show_header=False)
    for key, value in view.to_dict().items():
        if key == "detail":
            for sub, item in sorted(value.items()):
                table.add_row(_safe(f"detail.{sub}"), _safe(item))
        else:
            table.add_row(key, _safe(value))
    console.print(table)
