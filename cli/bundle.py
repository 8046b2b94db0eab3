"""``fedge bundle create``: package an ONNX or TFLite model trained elsewhere as a signed bundle."""

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Package models trained elsewhere as signed bundles.", no_args_is_help=True)


def _labels(text: str) -> list[str]:
    """``a,b,c``, or a text file with one label per line."""
    path = Path(text)
    if path.is_file():
        return [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return [label.strip() for label in text.split(",") if label.strip()]


def _shape(text: str) -> tuple[int, ...]:
    from fedge.shared.errors import ConfigError

    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError as e:
        raise ConfigError(f"--input-shape {text!r} is not like 3,224,224 or 30") from e


def _preprocessing(text: str) -> str | dict[str, Any]:
    import json

    from fedge.shared.errors import ConfigError

    if not text.endswith(".json"):
        return text
    try:
        data = json.loads(Path(text).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read preprocessing file {text}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{text} must hold a JSON object of preprocessing fields")
    return data


@app.command()
def create(
    model: Annotated[Path, typer.Argument(help="MODEL.onnx or MODEL.tflite.")],
    labels: Annotated[str, typer.Option(help="Class names 'a,b,c' or a file, one per line.")],
    input_shape: Annotated[str, typer.Option(help="One example: C,H,W (images) or F (features).")],
    version: Annotated[str, typer.Option(help="Bundle version, e.g. 1.0.0.")],
    out: Annotated[
        Path | None, typer.Option(help="Bundle directory (default: MODEL-bundle).")
    ] = None,
    preprocessing: Annotated[
        str, typer.Option(help="none, imagenet, or a JSON file of fedge preprocessing fields.")
    ] = "none",
    self_test: Annotated[
        Path | None, typer.Option(help="INPUTS.npy: preprocessed self-test inputs (n, ...).")
    ] = None,
    task: Annotated[str | None, typer.Option(help="Task name (default: the model's name).")] = None,
    key: Annotated[
        Path | None, typer.Option(help="Signing key (default: FEDGE_HOME/keys/signing.key).")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32 or int8 (what the model is).")] = "fp32",
    atol: Annotated[float | None, typer.Option(help="Self-test tolerance on devices.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Package a model trained elsewhere: self-test with the device runtime, sign, write."""
    from rich.console import Console

    from fedge.edge.packaging import create_bundle

    out = out or model.with_name(f"{model.stem}-bundle")
    manifest = create_bundle(
        model,
        out,
        labels=_labels(labels),
        input_shape=_shape(input_shape),
        version=version,
        preprocessing=_preprocessing(preprocessing),
        task_name=task,
        self_test=self_test,
        signing_key=key,
        atol=atol,
        precision=precision,
        force=force,
    )
    artifact = manifest.artifacts[0]
    Console().print(
        f"[green]bundle[/] {out} version [bold]{manifest.version}[/] ({manifest.bundle_id}): "
        f"{artifact.file}, task {manifest.task.name}, {len(manifest.labels)} labels, signed"
    )
