"""``fedge export``, ``fedge validate`` and ``fedge keys``: parse options, call the library, render.

Heavy imports (torch, onnx, litert-torch) happen inside the commands, so that
``fedge --help`` stays fast, and inside ``quiet_output``, so that what the
converters print goes to ``export.log`` beside the bundle, not to the terminal.
The root app (``fedge.cli``) registers ``export`` and ``validate`` as commands
and ``keys_app`` as the ``keys`` group, and turns a ``FedgeError`` into a
message and an exit code.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.cli.options import Insecure, ServerCa, SuperLink, TokenFile

keys_app = typer.Typer(
    help="The Ed25519 key that signs model bundles (devices trust its public half).",
    no_args_is_help=True,
)

EvalData = Annotated[
    str | None,
    typer.Option("--eval-data", help="Data spec to validate on (default: TASK:test)."),
]
KeyOption = Annotated[
    Path | None,
    typer.Option("--key", help="Private key path (default: $FEDGE_HOME/keys/signing.key)."),
]


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def export(
    source: Annotated[Path, typer.Argument(help="A run directory or a checkpoint file.")],
    formats: Annotated[str, typer.Option(help="Comma-separated: onnx, tflite.")] = "onnx,tflite",
    quantize: Annotated[
        str, typer.Option(help="Comma-separated: none (fp32), dynamic, static.")
    ] = "none,dynamic,static",
    calibration: Annotated[
        str | None,
        typer.Option(help="Data spec for static calibration (default: TASK:public)."),
    ] = None,
    eval_data: EvalData = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Bundle directory (default: RUN_DIR/bundle)."),
    ] = None,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Accuracy points an artifact may lose vs PyTorch.")
    ] = 1.0,
    key: KeyOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle directory.")] = False,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate/--no-validate",
            help="Validate with the device runtime (--no-validate: the bundle says it is not "
            "validated; no device runs it until `fedge validate`).",
        ),
    ] = True,
    federated: Annotated[
        bool | None,
        typer.Option(
            "--federated/--central",
            help="Calibrate and validate at the run's sites (default when the task has no "
            "built-in data and no --eval-data/--calibration is given), or on central data.",
        ),
    ] = None,
    server: SuperLink = "127.0.0.1:9092",
    ca: ServerCa = None,
    insecure: Insecure = False,
    token_file: TokenFile = None,
    count_noise: Annotated[
        float,
        typer.Option(
            help="--federated: Gaussian noise on the summed counts, in multiples of their "
            "per-example sensitivity (0: exact; epsilon goes in the model card)."
        ),
    ] = 0.0,
) -> None:
    """Export a run's model to ONNX/TFLite, quantize, validate and sign a bundle.

    Example: fedge export runs/exp1 --federated --server 127.0.0.1:9092 --max-accuracy-drop 2
    """
    from fedge.edge.export.quiet import log_path_for, quiet_output

    default = source / "bundle" if source.is_dir() else source.with_name(f"{source.stem}-bundle")
    out_dir = out if out is not None else default
    target = None
    if federated is None:
        federated = (
            validate and eval_data is None and calibration is None and _no_central_data(source)
        )
    if federated:
        target = _federated_target(server, ca, insecure, token_file, count_noise)
    log_path = log_path_for(out_dir)
    with quiet_output(log_path, f"fedge export {source}") as terminal:
        from rich.console import Console

        from fedge.edge.export.pipeline import export_bundle

        console = Console(file=terminal)
        with _render_failure(console, log_path):
            report = export_bundle(
                source,
                out_dir,
                formats=_split(formats),
                quantize=_split(quantize),
                calibration=calibration,
                eval_data=eval_data,
                signing_key=key,
                max_accuracy_drop=max_accuracy_drop,
                force=force,
                validate=validate,
                console=console,
                federated=None if target is None else _with_progress(target, console),
            )
        console.print(report.table())
        console.print(f"bundle {report.bundle_id} written to [bold]{report.bundle_dir}[/]")
        if not report.validated:
            console.print(
                "[yellow]not validated[/]: no device runs its artifacts until "
                f"`fedge validate {report.bundle_dir}` records a validation"
            )
        console.print(f"log of the converters: {log_path}")


def validate(
    bundle_dir: Annotated[Path, typer.Argument(help="The bundle directory to validate.")],
    eval_data: EvalData = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            help="Run directory or checkpoint the bundle came from (default: the bundle's "
            "parent, where `fedge export` puts it).",
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float, typer.Option(help="Accuracy points an artifact may lose vs PyTorch.")
    ] = 1.0,
    key: KeyOption = None,
) -> None:
    """Validate an exported bundle (again) with the device runtime, and re-sign its results."""
    from fedge.edge.export.quiet import log_path_for, quiet_output

    log_path = log_path_for(bundle_dir)
    with quiet_output(log_path, f"fedge validate {bundle_dir}") as terminal:
        from rich.console import Console

        from fedge.edge.export.validate_bundle import revalidate_bundle

        console = Console(file=terminal)
        with _render_failure(console, log_path):
            report = revalidate_bundle(
                bundle_dir, source=model, eval_data=eval_data, signing_key=key,
                max_accuracy_drop=max_accuracy_drop,
            )  # fmt: skip
        console.print(report.table())
        console.print(f"bundle {report.bundle_id} validated and signed again: {report.bundle_dir}")
        console.print(f"log of the runtimes: {log_path}")


def _no_central_data(source: Path) -> bool:
    """Whether the run's task has no built-in data (a user task: images, tabular)."""
    from fedge.shared.ml.checkpoint import load_checkpoint, resolve_checkpoint
    from fedge.shared.tasks import BUILTIN_TASKS

    return load_checkpoint(resolve_checkpoint(source)).task.name not in BUILTIN_TASKS


def _federated_target(
    server: str, ca: Path | None, insecure: bool, token_file: Path | None, count_noise: float
) -> Any:
    """The SuperLink, CA and credential to reach the run's sites (as `fedge run` finds them)."""
    from fedge.cli.run import _control_token, _root_certificates
    from fedge.edge.export.federated import FederatedTarget
    from fedge.server.submit import submit_run
    from fedge.shared.errors import ConfigError

    if not 0 <= count_noise <= 1e6:
        raise ConfigError("--count-noise must be in [0, 1e6]")
    return FederatedTarget(
        server, _root_certificates(ca, insecure), _control_token(token_file), submit_run,
        count_noise_multiplier=count_noise,
    )  # fmt: skip


def _with_progress(target: Any, console: Any) -> Any:
    """``target`` printing the artifact job's progress on ``console``."""
    from dataclasses import replace

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "round-start" and event.get("job") == "artifacts":
            console.print(f"  sent to {event.get('sites')} sites; waiting for their sums")

    return replace(target, on_event=on_event)


@contextmanager
def _render_failure(console: Any, log_path: Path) -> Iterator[None]:
    """Show the validation table of a failed export before the error propagates."""
    from fedge.edge.export.pipeline import ArtifactsFailed

    try:
        yield
    except ArtifactsFailed as e:
        console.print(e.report.table())
        console.print(f"log of the converters: {log_path}")
        raise


@keys_app.command("create")
def create(
    key: KeyOption = None,
    force: Annotated[
        bool, typer.Option(help="Replace an existing key (old bundles stop verifying).")
    ] = False,
) -> None:
    """Create the bundle signing key pair (private key mode 0600, public key beside it)."""
    from fedge.shared.paths import signing_key_path
    from fedge.shared.signing import generate_signing_key

    private = key or signing_key_path()
    public = generate_signing_key(private, overwrite=force)
    typer.echo(f"private key: {private} (keep it on the server; never copy it)")
    _show(private, public)


@keys_app.command("show")
def show(key: KeyOption = None) -> None:
    """Print the public key and its fingerprint, to copy onto devices."""
    from fedge.shared.paths import signing_key_path
    from fedge.shared.signing import public_key_path_for

    private = key or signing_key_path()
    _show(private, public_key_path_for(private))


def _show(private: Path, public: Path) -> None:
    from fedge.shared.errors import SecurityError
    from fedge.shared.signing import load_public_key, public_key_fingerprint

    if not public.is_file():
        raise SecurityError(
            f"no public key at {public}",
            hint="create the key pair with `fedge keys create` (or pass --key PATH)",
        )
    fingerprint = public_key_fingerprint(load_public_key(public))
    typer.echo(f"public key: {public}")
    typer.echo(f"fingerprint: {fingerprint}")
    typer.echo("copy it onto each device as $FEDGE_HOME/keys/signing.pub (or pass `--key` there):")
    typer.echo(public.read_text(encoding="utf-8").rstrip())
