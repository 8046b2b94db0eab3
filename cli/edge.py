"""``fedge edge ...``: run and benchmark signed bundles on a device (no torch, no flwr).

Thin typer commands: parse the options, call ``fedge.edge.device`` and render
with rich. Errors are ``FedgeError``s, turned into a message and an exit code
by the root ``fedge`` command.
"""

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fedge.cli.options import TrustedKey, trusted_key_or_default

app = typer.Typer(
    help="Run models on an edge device (no torch needed).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class Format(StrEnum):
    onnx = "onnx"
    tflite = "tflite"


class Precision(StrEnum):
    fp32 = "fp32"
    int8 = "int8"


BundleArg = Annotated[Path, typer.Argument(help="Bundle directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.command()
def predict(
    bundle: BundleArg,
    inputs: Annotated[
        list[Path], typer.Argument(help="Image files, CSV files, .npy files or folders.")
    ],
    key: TrustedKey = None,
    format: Annotated[Format | None, typer.Option(help="Artifact format to run.")] = None,
    precision: Annotated[Precision | None, typer.Option(help="Artifact precision.")] = None,
    preprocessed: Annotated[
        bool,
        typer.Option(
            "--preprocessed", help="Treat .npy inputs as already preprocessed model inputs."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify BUNDLE and predict the label of each INPUT."""
    from rich.console import Console
    from rich.table import Table

    from fedge.edge.device.inputs import load_inputs
    from fedge.edge.device.runtime import EdgeModel

    fmt = format.value if format else None
    prec = precision.value if precision else None
    with EdgeModel.open(bundle, trusted_key_or_default(key), format=fmt, precision=prec) as model:
        batch = load_inputs(inputs, model.task, preprocessed=True if preprocessed else None)
        result = model.predict(batch.x)
        info = model.describe()
    rows = [
        {"input": name, "label": label, "index": int(index), "score": round(float(score), 6)}
        for name, label, index, score in zip(
            batch.names, result.labels, result.indices, result.scores, strict=True
        )
    ]
    if as_json:
        typer.echo(json.dumps({**info, "predictions": rows}, indent=2))
        return
    table = Table(caption=f"bundle {info['bundle_id']} ({info['version']}), {info['artifact']}")
    for column in ("input", "label", "score"):
        table.add_column(column, justify="right" if column == "score" else "left")
    for row in rows:
        table.add_row(str(row["input"]), str(row["label"]), f"{row['score']:.3f}")
    Console().print(table)


@app.command()
def bench(
    bundle: BundleArg,
    key: TrustedKey = None,
    iterations: Annotated[int, typer.Option(min=1, help="Timed runs at batch 1.")] = 100,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs first.")] = 10,
    batch: Annotated[int, typer.Option(min=1, help="Batch size for throughput.")] = 32,
    as_json: JsonOpt = False,
) -> None:
    """Measure size, load time, latency, throughput, memory and self-test of every artifact."""
    from rich.console import Console

    from fedge.edge.device.bench import bench_bundle, render_bench_table

    rows = bench_bundle(
        bundle, trusted_key_or_default(key), warmup=warmup, iterations=iterations, batch=batch
    )
    if as_json:
        typer.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    Console().print(render_bench_table(rows))
