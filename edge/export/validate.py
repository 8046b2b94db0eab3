"""Validate exported artifacts against the PyTorch model; the caller decides what fails export.

Export and validation are separate steps (Optimum's pattern): this module runs
each artifact with its own runtime on the evaluation set and measures, against
the PyTorch logits on the same preprocessed inputs, the max absolute logit
difference, top-1 agreement, accuracy and the accuracy drop in points. An
artifact *passes* when its accuracy drop is within the allowed budget and,
for fp32 artifacts, its logits match PyTorch within the fp32 tolerance (an fp32
mismatch means a broken conversion, whatever the accuracy says).
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

Predictor = Callable[[np.ndarray], np.ndarray]

# Self-test tolerances, relative to the largest |logit| of the reference (``scale``).
# fp32 artifacts reproduce PyTorch to float rounding; int8 kernels differ between
# CPUs (VNNI/dot-product or not, 8- vs 16-bit accumulation), so a device is allowed
# a tenth of the logit range against the logits export recorded for that artifact.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
INT8_ATOL = 1e-3
INT8_RTOL = 0.1


@dataclass(frozen=True)
class ValidationResult:
    """What validation measured for one artifact (a row of the validation table)."""

    artifact: str
    format: str
    precision: str
    quantization: str
    size: int
    max_abs_diff: float | None  # None when the artifact produced no comparable output
    top1_agreement: float
    accuracy: float
    reference_accuracy: float
    accuracy_drop_points: float
    atol: float
    passed: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def manifest_record(self) -> dict[str, Any]:
        """The ``validation`` object of the artifact's manifest entry."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy,
            "accuracy_drop_points": self.accuracy_drop_points,
            "passed": self.passed,
        }


def tolerance(precision: str, reference_logits: np.ndarray) -> float:
    """The absolute logit tolerance of an artifact of ``precision`` (see module constants)."""
    scale = float(np.max(np.abs(reference_logits))) if reference_logits.size else 0.0
    if precision == "fp32":
        return FP32_ATOL + FP32_RTOL * scale
    return INT8_ATOL + INT8_RTOL * scale


def onnx_predictor(path: Path | str) -> Predictor:
    """Run an ONNX file with onnxruntime on the CPU (whole batches; the batch axis is free)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        outputs = [
            session.run(None, {input_name: x[i : i + 256]})[0] for i in range(0, len(x), 256)
        ]
        return np.concatenate(outputs).astype(np.float32)

    return predict


def tflite_predictor(path: Path | str) -> Predictor:
    """Run a ``.tflite`` file with the LiteRT interpreter, one fixed-size batch at a time."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    batch = int(inp["shape"][0])

    def predict(x: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, len(x), batch):
            chunk = x[start : start + batch]
            rows = len(chunk)
            if rows < batch:
                pad = np.zeros((batch - rows, *chunk.shape[1:]), chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            interpreter.set_tensor(inp["index"], _quantize(np.ascontiguousarray(chunk), inp))
            interpreter.invoke()
            outputs.append(_dequantize(interpreter.get_tensor(out["index"]), out)[:rows])
        return np.concatenate(outputs).astype(np.float32)

    return predict


def _quantize(x: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    """Float input -> the tensor's integer type, for models with quantized I/O."""
    dtype = detail["dtype"]
    if dtype == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if y.dtype == np.float32:
        return y
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale


def predictor_for(path: Path | str, format: str) -> Predictor:
    """The predictor for an artifact of ``format`` (``onnx`` or ``tflite``)."""
    return onnx_predictor(path) if format == "onnx" else tflite_predictor(path)


def validate_artifact(
    artifact: str,
    format: str,
    precision: str,
    quantization: str,
    size: int,
    logits: np.ndarray,
    reference_logits: np.ndarray,
    labels: np.ndarray,
    *,
    max_accuracy_drop: float,
) -> ValidationResult:
    """Compare one artifact's logits with PyTorch's on the evaluation set.

    Parameters
    ----------
    artifact, format, precision, quantization, size
        What the artifact is (for the table and the manifest).
    logits
        The artifact's logits on the evaluation inputs, (N, K).
    reference_logits
        PyTorch's logits on the same inputs, (N, K).
    labels
        True labels, (N,).
    max_accuracy_drop
        Accuracy points the artifact may lose against PyTorch and still pass.

    Returns
    -------
    ValidationResult
        The measurements, ``passed`` and, when it failed, why.
    """
    logits = np.asarray(logits, np.float32)
    atol = tolerance(precision, reference_logits)
    facts: dict[str, Any] = {
        "artifact": artifact, "format": format, "precision": precision,
        "quantization": quantization, "size": size,
    }
    if logits.shape != reference_logits.shape or not np.all(np.isfinite(logits)):
        reason = (
            f"output shape {logits.shape} is not {reference_logits.shape}"
            if logits.shape != reference_logits.shape
            else "outputs contain NaN or infinity"
        )
        return unrunnable(
            artifact, format, precision, quantization, size, reference_logits, labels, reason
        )
    diff = float(np.max(np.abs(logits - reference_logits))) if logits.size else 0.0
    agreement = float(np.mean(logits.argmax(1) == reference_logits.argmax(1)))
    accuracy = _accuracy(logits, labels)
    reference = _accuracy(reference_logits, labels)
    drop = round((reference - accuracy) * 100.0, 4)
    reasons = []
    if drop > max_accuracy_drop:
        reasons.append(f"accuracy drop {drop:.2f} points > allowed {max_accuracy_drop:g}")
    if precision == "fp32" and diff > atol:
        reasons.append(f"fp32 logits differ from PyTorch by {diff:.3g} > {atol:.3g}")
    return ValidationResult(
        **facts, max_abs_diff=diff, top1_agreement=agreement, accuracy=accuracy,
        reference_accuracy=reference, accuracy_drop_points=drop, atol=atol,
        passed=not reasons, reason="; ".join(reasons),
    )


def unrunnable(
    artifact: str,
    format: str,
    precision: str,
    quantization: str,
    size: int,
    reference_logits: np.ndarray,
    labels: np.ndarray,
    reason: str,
) -> ValidationResult:
    """The failed result of an artifact its runtime could not load or run."""
    reference = _accuracy(reference_logits, labels)
    return ValidationResult(
        artifact=artifact, format=format, precision=precision, quantization=quantization,
        size=size, max_abs_diff=None, top1_agreement=0.0, accuracy=0.0,
        reference_accuracy=reference, accuracy_drop_points=round(reference * 100.0, 4),
        atol=tolerance(precision, reference_logits), passed=False, reason=reason,
    )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels)) if len(labels) else 0.0


def render_table(rows: Iterable[Mapping[str, Any]], title: str = "Validation") -> Any:
    """A rich ``Table`` of validation rows (``ValidationResult.to_dict()`` or skipped rows).

    A skipped row has ``artifact``, ``status: "skipped"`` and ``reason``. The
    reasons of failed and skipped rows go in the caption, one line each, so the
    table itself stays narrow enough for an 80-column log.
    """
    from rich import box
    from rich.table import Table

    table = Table(
        title=title, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    table.add_column("artifact", no_wrap=True)
    for name in ("size", "max|Δ|", "agree", "acc", "drop"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=4)
    notes = []
    for row in rows:
        name = str(row["artifact"])
        if row.get("status") == "skipped":
            table.add_row(name, "-", "-", "-", "-", "-", "[yellow]skip[/]")
            notes.append(f"[yellow]{name} skipped[/]: {row['reason']}")
            continue
        if not row["passed"]:
            notes.append(f"[red]{name} failed[/]: {row['reason']}")
        table.add_row(
            name,
            _size(int(row["size"])),
            "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}",
            f"{row['top1_agreement']:.3f}",
            f"{row['accuracy']:.4f}",
            f"{row['accuracy_drop_points']:+.2f}",
            "[green]pass[/]" if row["passed"] else "[red]FAIL[/]",
        )
    if notes:
        table.caption = "\n".join(notes)
    return table


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def reference_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """PyTorch's float32 logits of ``model`` on preprocessed inputs (CPU, eval mode)."""
    from fedge.shared.ml.training import predict_logits

    return predict_logits(model, x).astype(np.float32)


def validate_file(
    path: Path,
    artifact: str,
    format: str,
    precision: str,
    quantization: str,
    x: np.ndarray,
    labels: np.ndarray,
    reference_logits: np.ndarray,
    *,
    max_accuracy_drop: float,
) -> ValidationResult:
    """Run one artifact file on the evaluation inputs ``x`` and validate it.

    A runtime that cannot load or run the file fails it (``unrunnable``) with
    the runtime's reason, rather than raising.
    """
    size = Path(path).stat().st_size
    facts = (artifact, format, precision, quantization, size)
    try:
        logits = predictor_for(path, format)(x)
    except Exception as e:  # runtimes raise their own types
        text = str(e).strip().splitlines()
        reason = f"its runtime cannot run it: {text[0] if text else type(e).__name__}"[:300]
        return unrunnable(*facts, reference_logits, labels, reason)
    return validate_artifact(
        *facts, logits, reference_logits, labels, max_accuracy_drop=max_accuracy_drop
    )


def table_rows(
    order: Iterable[str],
    results: Mapping[str, ValidationResult],
    skipped: Mapping[str, str],
) -> list[dict[str, Any]]:
    """The validation table: measured rows (``status`` pass/fail) then skipped ones."""
    rows: list[dict[str, Any]] = []
    names = [*order, *(n for n in skipped if n not in results)]
    for name in dict.fromkeys(names):
        if name in results:
            row = results[name].to_dict()
            row["status"] = "pass" if row["passed"] else "fail"
            rows.append(row)
        elif name in skipped:
            rows.append({"artifact": name, "status": "skipped", "reason": skipped[name]})
    return rows


def write_validation_file(bundle_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``<bundle>.validation.json`` beside the bundle directory; return its path.

    Beside, not inside: it exists even when no artifact passed and no bundle was
    written, and a device refuses any file in a bundle that the manifest does not
    list. Inside the bundle the same table is in ``model_card.json`` and the manifest.
    """
    from fedge.shared.atomic import atomic_write_json

    path = bundle_dir.parent / f"{bundle_dir.name}.validation.json"
    atomic_write_json(path, {"format": "fedge-validation/1", "rows": rows})
    return path
