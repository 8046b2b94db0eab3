"""The demo's side-by-side: what the sites measured, and what central data would have said.

``fedge demo`` calibrates and validates through its sites (``fedge export --federated``).
The coordinator of the demo happens to hold digits' public and test splits; they are
used here only to print, beside the federated numbers, what central evaluation (on
``digits:test``) and central calibration (on ``digits:public``) would have given. Nothing
here decides what is signed.
"""

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import bundle

CENTRAL_EVAL = "digits:test"
CENTRAL_CALIBRATION = "digits:public"


def _accuracy(bundle_dir: Path, manifest: Any, entry: Any, x: np.ndarray, y: np.ndarray) -> float:
    from fedge.edge.device.runtime import load_artifact

    with load_artifact(bundle_dir, manifest, entry) as model:
        return float(np.mean(model.predict(x).logits.argmax(1) == y))


def central_comparison(bundle_dir: Path, run_dir: Path) -> list[dict[str, Any]]:
    """Per bundled artifact: federated accuracy (from the card) and central accuracy.

    A last row is a static int8 model calibrated centrally on ``digits:public`` from the
    bundle's fp32 ONNX, evaluated centrally: what central calibration would have shipped.
    """
    import json

    from fedge.edge.export.calibration import (
        DEFAULT_CALIBRATION_EXAMPLES,
        CalibrationReader,
        load_prepared,
    )
    from fedge.edge.export.quantize import quantize_onnx_static
    from fedge.edge.export.validate import reference_logits
    from fedge.shared.ml.checkpoint import (
        load_checkpoint,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    manifest = bundle.read_manifest(bundle_dir)
    card = json.loads((bundle_dir / bundle.MODEL_CARD).read_text(encoding="utf-8"))
    federated = {r["artifact"]: r for r in card.get("validation") or []}
    test = load_prepared(CENTRAL_EVAL, manifest.task)
    model = load_model_from_checkpoint(load_checkpoint(resolve_checkpoint(run_dir)))
    reference = float(np.mean(reference_logits(model, test.x).argmax(1) == test.y))
    rows: list[dict[str, Any]] = [
        {"artifact": "PyTorch fp32", "federated": _reference(federated), "central": reference}
    ]
    fp32_onnx = None
    for entry in manifest.artifacts:
        name = Path(entry.file).name
        fp32_onnx = bundle_dir / entry.file if name == "model-fp32.onnx" else fp32_onnx
        rows.append({
            "artifact": name,
            "federated": federated.get(name, {}).get("accuracy"),
            "central": _accuracy(bundle_dir, manifest, entry, test.x, test.y),
        })  # fmt: skip
    if fp32_onnx is not None:
        calibration = load_prepared(
            CENTRAL_CALIBRATION, manifest.task, DEFAULT_CALIBRATION_EXAMPLES
        )
        with tempfile.TemporaryDirectory(prefix="fedge-demo-central-") as tmp:
            central = Path(tmp) / "model-int8-static.onnx"
            quantize_onnx_static(fp32_onnx, central, CalibrationReader(calibration.x))
            entry = next(e for e in manifest.artifacts if e.file.endswith("model-fp32.onnx"))
            rows.append({
                "artifact": "model-int8-static.onnx, calibrated centrally",
                "federated": None,
                "central": _accuracy(Path(tmp), manifest, _renamed(entry, central), test.x, test.y),
            })  # fmt: skip
    return rows


def _reference(federated: dict[str, Any]) -> float | None:
    for row in federated.values():
        if "reference_accuracy" in row:
            return float(row["reference_accuracy"])
    return None


def _renamed(entry: Any, path: Path) -> Any:
    from dataclasses import replace

    return replace(entry, file=path.name, precision="int8", quantization="static")


def render_comparison(rows: list[dict[str, Any]], statement: str) -> Any:
    """A rich ``Table``: artifact, federated accuracy (what decided), central accuracy."""
    from rich import box
    from rich.table import Table

    from fedge.edge.export.validate import percent

    table = Table(title="Federated (decides) vs central (for comparison only)", box=box.SIMPLE_HEAD)
    table.add_column("artifact", no_wrap=True)
    table.add_column("federated acc", justify="right")
    table.add_column(f"central acc ({CENTRAL_EVAL})", justify="right")
    for row in rows:
        fed = "-" if row["federated"] is None else percent(row["federated"])
        table.add_row(row["artifact"], fed, percent(row["central"]))
    table.caption = (
        f"federated: {statement}; central static int8 calibrated on {CENTRAL_CALIBRATION}"
    )
    return table
