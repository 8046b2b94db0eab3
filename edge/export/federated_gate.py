"""The gate on federated numbers: which artifacts may be signed, judged from the sites' sums.

An artifact passes when its federated accuracy drop against the fp32 PyTorch model (both
counted by the sites on the same held-out examples) is within ``max_accuracy_drop``
points, and, for an fp32 artifact, when its logits match PyTorch on a few synthetic probe
inputs (a broken conversion shows there whatever the accuracy says; the probe holds no
data, so the coordinator can run it itself). The same probe inputs become the bundle's
self-test, which a device runs before serving.
"""

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedge.edge.export.validate import ValidationResult, tolerance
from fedge.shared.bundle import Manifest
from fedge.shared.federated_counts import EvaluationSums
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)
PROBE_SEED = 0


def probe_inputs(task: TaskSpec, n: int) -> np.ndarray:
    """``n`` synthetic inputs of the task's shape (standard normal, fixed seed): no one's data."""
    rng = np.random.default_rng(PROBE_SEED)
    return rng.standard_normal((n, *task.input_shape)).astype(np.float32)


def probe_logits(bundle_dir: Path, manifest: Manifest, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each artifact's logits on the probe, by base name, as the device runtime computes them."""
    from fedge.edge.device.runtime import load_artifact

    out: dict[str, np.ndarray] = {}
    for entry in manifest.artifacts:
        try:
            with load_artifact(bundle_dir, manifest, entry) as model:
                out[Path(entry.file).name] = np.asarray(model.predict_tensor(x), np.float32)
        except Exception as e:  # the runtimes raise their own types: no logits, the gate fails it
            log.warning("%s does not run on the probe: %s", entry.file, str(e)[:200])
    return out


def gate(
    manifest: Manifest,
    sums: EvaluationSums,
    probe: Mapping[str, np.ndarray],
    reference_probe: np.ndarray,
    *,
    max_accuracy_drop: float,
) -> list[ValidationResult]:
    """One ``ValidationResult`` per artifact of ``manifest``, judged on the federated sums.

    Parameters
    ----------
    manifest
        The exported (unvalidated) bundle's manifest.
    sums
        The sites' summed counts (``fedge.edge.export.federated.evaluate_artifacts``).
    probe, reference_probe
        Each artifact's logits on the probe inputs, and PyTorch's.
    max_accuracy_drop
        Accuracy points an artifact may lose against PyTorch and still pass.
    """
    n = max(sums.examples, 1)
    reference = min(sums.reference_correct / n, 1.0)
    results = []
    for entry in manifest.artifacts:
        name = Path(entry.file).name
        counts = sums.artifacts.get(name)
        logits = probe.get(name)
        reasons = []
        diff: float | None = None
        if logits is None or logits.shape != reference_probe.shape:
            reasons.append("the device runtime cannot run it on the probe inputs")
        else:
            diff = float(np.max(np.abs(logits - reference_probe))) if logits.size else 0.0
        atol = tolerance(entry.precision, reference_probe)
        if counts is None:
            reasons.append("the sites did not evaluate it")
            accuracy = agreement = 0.0
        else:
            accuracy = min(counts.correct / n, 1.0)
            agreement = min(counts.agree / n, 1.0)
        drop = round((reference - accuracy) * 100.0, 4)
        if drop > max_accuracy_drop:
            reasons.append(
                f"federated accuracy drop {drop:.2f} points > allowed {max_accuracy_drop:g}"
            )
        if entry.precision == "fp32" and diff is not None and diff > atol:
            reasons.append(f"fp32 logits differ from PyTorch by {diff:.3g} > {atol:.3g} (probe)")
        result = ValidationResult(
            artifact=name, format=entry.format, precision=entry.precision,
            quantization=entry.quantization, size=entry.size, max_abs_diff=diff,
            top1_agreement=agreement, accuracy=accuracy, reference_accuracy=reference,
            accuracy_drop_points=drop, atol=atol, passed=not reasons, reason="; ".join(reasons),
        )  # fmt: skip
        results.append(result)
    return results
