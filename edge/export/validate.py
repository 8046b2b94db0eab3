"""Validate a bundle's artifacts with the device runtime against PyTorch; the caller decides.

Export and validation are separate steps (Optimum's ``export()`` then
``validate_model_outputs()``): ``validate`` opens an exported bundle as a device
would (``fedge.edge.device.runtime``: signature check, NHWC input, fixed or
dynamic batch, int8 I/O) and measures each artifact on the evaluation set
against the PyTorch logits of the same preprocessed inputs: max absolute logit
difference, top-1 agreement, accuracy and accuracy drop in points. An artifact
*passes* when its accuracy drop is within the allowed budget and, for fp32
artifacts, its logits match PyTorch within the fp32 tolerance (an fp32 mismatch
means a broken conversion, whatever the accuracy says). Every artifact is run
and reported before ``ValidationFailed`` is raised once, naming all failures.
"""

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared.errors import ConfigError, ExportError
from fedge.shared.signing import Ed25519PublicKey

log = logging.getLogger(__name__)

# Self-test tolerances, relative to the largest |logit| of the reference (``scale``).
# fp32 artifacts reproduce PyTorch to float rounding; int8 kernels differ between
# CPUs (VNNI/dot-product or not, 8- vs 16-bit accumulation), so a device is allowed
# a tenth of the logit range against the logits export recorded for that artifact.
FP32_ATOL = 1e-5
FP32_RTOL = 1e-4
INT8_ATOL = 1e-3
INT8_RTOL = 0.1
# The table status of an artifact exported with ``--no-validate``.
NOT_VALIDATED = "not validated"


def check_max_accuracy_drop(points: float) -> float:
    """The gate's bar, refused unless a finite number of points in [-100, 100].

    ``drop > nan`` is always False: a NaN bar would pass every artifact unchecked. A
    negative bar is allowed (it demands a gain over PyTorch: strict, never lax).

    Raises
    ------
    ConfigError
        NaN, infinite, or beyond 100 points either way.
    """
    if not (math.isfinite(points) and -100 <= points <= 100):
        raise ConfigError(
            f"--max-accuracy-drop must be a number of points in [-100, 100], not {points}"
        )
    return points


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


def compare_logits(
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
        "artifact": artifact,
        "format": format,
        "precision": precision,
        "quantization": quantization,
        "size": size,
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
        **facts,
        max_abs_diff=diff,
        top1_agreement=agreement,
        accuracy=accuracy,
        reference_accuracy=reference,
        accuracy_drop_points=drop,
        atol=atol,
        passed=not reasons,
        reason="; ".join(reasons),
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
        artifact=artifact,
        format=format,
        precision=precision,
        quantization=quantization,
        size=size,
        max_abs_diff=None,
        top1_agreement=0.0,
        accuracy=0.0,
        reference_accuracy=reference,
        accuracy_drop_points=round(reference * 100.0, 4),
        atol=tolerance(precision, reference_logits),
        passed=False,
        reason=reason,
    )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) == labels)) if len(labels) else 0.0


def render_table(rows: Iterable[Mapping[str, Any]], title: str = "Validation") -> Any:
    """A rich ``Table`` of validation rows (``ValidationResult.to_dict()`` or skipped rows).

    A skipped row has ``artifact``, ``status: "skipped"`` and ``reason``; an
    artifact exported with ``--no-validate`` has ``status: "not validated"``. The
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
        if row.get("status") == NOT_VALIDATED:
            table.add_row(name, _size(int(row["size"])), "-", "-", "-", "-", "not run")
            continue
        if not row["passed"]:
            notes.append(f"[red]{name} failed[/]: {row['reason']}")
        table.add_row(
            name,
            _size(int(row["size"])),
            "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}",
            f"{row['top1_agreement']:.3f}",
            percent(row["accuracy"]),
            f"{row['accuracy_drop_points']:+.2f}",
            "[green]✓ pass[/]" if row["passed"] else "[red]✗ FAIL[/]",
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


class ValidationFailed(ExportError):
    """Some artifacts failed validation; ``results`` holds every artifact's result."""

    def __init__(self, results: list[ValidationResult], bundle_dir: Path) -> None:
        failed = [r for r in results if not r.passed]
        detail = "; ".join(f"{r.artifact} ({r.reason})" for r in failed)
        super().__init__(
            f"{len(failed)} of {len(results)} artifacts of {bundle_dir} failed validation: {detail}"
        )
        self.results = results
        self.bundle_dir = bundle_dir


def validate(
    bundle_dir: Path | str,
    trusted_key: Path | str | Ed25519PublicKey,
    x: np.ndarray,
    labels: np.ndarray,
    reference_logits: np.ndarray,
    *,
    max_accuracy_drop: float = 1.0,
) -> list[ValidationResult]:
    """Run every artifact of a bundle with the device runtime and compare with PyTorch.

    Parameters
    ----------
    bundle_dir
        An exported bundle (validated or not).
    trusted_key
        The public key the bundle must verify under (the signing key's public half).
    x, labels
        The preprocessed evaluation inputs (canonical layout, float32) and their labels.
    reference_logits
        PyTorch's logits on ``x`` (``reference_logits``).
    max_accuracy_drop
        Accuracy points an artifact may lose against PyTorch and still pass.

    Returns
    -------
    list[ValidationResult]
        One per artifact, in manifest order, all passed.

    Raises
    ------
    ValidationFailed
        After every artifact was run, if any failed; ``.results`` has all of them.
    BundleError
        The bundle does not verify under ``trusted_key``.
    """
    from fedge.edge.device.runtime import load_artifact
    from fedge.shared.bundle import verify_bundle

    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir, trusted_key)
    results = []
    for entry in manifest.artifacts:
        name = Path(entry.file).name
        facts = (name, entry.format, entry.precision, entry.quantization, entry.size)
        try:
            with load_artifact(bundle_dir, manifest, entry) as model:
                logits = model.predict(np.ascontiguousarray(x, np.float32)).logits
        except Exception as e:  # runtimes raise their own types; the artifact fails, not us
            reason = f"the device runtime cannot run it: {_first_line(e)}"
            result = unrunnable(*facts, reference_logits, labels, reason)
        else:
            result = compare_logits(
                *facts, logits, reference_logits, labels, max_accuracy_drop=max_accuracy_drop
            )
        if result.passed:
            log.info("✓ %s: accuracy %.2f%%", name, result.accuracy * 100)
        else:
            log.warning("✗ %s: %s", name, result.reason)
        results.append(result)
    if not all(r.passed for r in results):
        raise ValidationFailed(results, bundle_dir)
    return results


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def percent(value: float) -> str:
    """An accuracy as people read it: ``0.9823 -> "98.23%"``."""
    return f"{value * 100:.2f}%"


def table_rows(
    order: Iterable[str],
    results: Mapping[str, ValidationResult],
    skipped: Mapping[str, str],
    sizes: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """The validation table: measured rows (``status`` pass/fail) then skipped ones.

    An artifact in ``order`` with neither a result nor a skip reason was not
    validated; its row has its size from ``sizes`` and ``status: "not validated"``.
    """
    rows: list[dict[str, Any]] = []
    names = [*order, *(n for n in skipped if n not in results)]
    for name in dict.fromkeys(names):
        if name in results:
            row = results[name].to_dict()
            row["status"] = "pass" if row["passed"] else "fail"
            rows.append(row)
        elif name in skipped:
            rows.append({"artifact": name, "status": "skipped", "reason": skipped[name]})
        elif sizes is not None and name in sizes:
            rows.append({"artifact": name, "status": NOT_VALIDATED, "size": sizes[name]})
    return rows


def write_validation_file(bundle_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``<bundle>.validation.json`` beside the bundle directory; return its path.

    Beside, not inside: it exists even when no artifact passed and no bundle was
    written, and a device refuses any file in a bundle that the manifest does not
    list. Inside the bundle the same table is in ``model_card.json`` and the manifest.
    """
    from fedge.shared.atomic import atomic_write_json

    path = validation_file_path(bundle_dir)
    atomic_write_json(path, {"format": "fedge-validation/1", "rows": rows})
    return path


def validation_file_path(bundle_dir: Path) -> Path:
    """``<bundle>.validation.json``, beside the bundle directory."""
    return bundle_dir.parent / f"{bundle_dir.name}.validation.json"
