"""The bundle's self-test: a few preprocessed inputs and each artifact's expected logits.

Export records them in the manifest (``make_self_test``); a device replays them
through the artifact it loaded (``run_self_test``) to prove the model computes on
this hardware what it computed where it was validated. Re-exported by
``fedge.shared.bundle``.
"""

import base64
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.shared.errors import BundleError

if TYPE_CHECKING:
    from fedge.shared.bundle import ArtifactEntry, Manifest

DEFAULT_ATOL = 1e-4


def encode_array(array: np.ndarray) -> str:
    """Base64 of an array as float32 little-endian (the self-test encoding)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def decode_array(text: str, shape: Iterable[int]) -> np.ndarray:
    """Inverse of ``encode_array``: a native float32 array of ``shape``."""
    shape = tuple(int(d) for d in shape)
    try:
        flat = np.frombuffer(base64.b64decode(text, validate=True), dtype="<f4")
        return flat.reshape(shape).astype(np.float32)
    except (ValueError, TypeError) as e:
        raise BundleError(f"self-test array does not decode to shape {shape}: {e}") from e


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of running an artifact on the bundle's self-test inputs."""

    passed: bool
    max_abs_diff: float
    label_agreement: float
    atol: float = DEFAULT_ATOL
    examples: int = 0
    detail: str = ""


def make_self_test(
    inputs: np.ndarray,
    expected: Mapping[str, np.ndarray],
    expected_labels: Iterable[int],
) -> dict[str, Any]:
    """The manifest's ``self_test`` record (for export): inputs and each artifact's logits."""
    inputs = np.asarray(inputs, dtype=np.float32)
    shapes = {np.asarray(v).shape for v in expected.values()}
    if len(shapes) != 1:
        raise BundleError(f"self-test expectations have different shapes: {sorted(shapes)}")
    return {
        "inputs": encode_array(inputs),
        "shape": list(inputs.shape),
        "expected": {name: encode_array(np.asarray(v)) for name, v in expected.items()},
        "expected_shape": list(shapes.pop()),
        "expected_labels": [int(label) for label in expected_labels],
    }


def self_test_inputs(manifest: "Manifest") -> np.ndarray:
    """The bundle's preprocessed self-test inputs (float32, canonical layout)."""
    if not manifest.self_test:
        raise BundleError(f"bundle {manifest.bundle_id} has no self-test data")
    return decode_array(manifest.self_test["inputs"], manifest.self_test["shape"])


def run_self_test(
    manifest: "Manifest",
    artifact_entry: "ArtifactEntry",
    predict_fn: Callable[[np.ndarray], np.ndarray],
) -> SelfTestResult:
    """Run ``predict_fn`` (inputs -> logits) on the self-test inputs and compare.

    Passes when every logit is within the artifact's ``tolerance.atol`` of the
    logits export recorded for this artifact. ``label_agreement`` is the share
    of top-1 predictions equal to ``expected_labels``.

    Raises
    ------
    BundleError
        If the bundle has no self-test data, or none for this artifact.
    """
    inputs = self_test_inputs(manifest)
    record = manifest.self_test or {}
    encoded = record.get("expected", {}).get(artifact_entry.file)
    if encoded is None:
        raise BundleError(
            f"bundle {manifest.bundle_id}: no self-test expectation for {artifact_entry.file}"
        )
    expected = decode_array(encoded, record["expected_shape"])
    labels = np.asarray(record.get("expected_labels") or expected.argmax(axis=1))
    got = np.asarray(predict_fn(inputs), dtype=np.float32)
    n, atol = int(inputs.shape[0]), artifact_entry.atol
    if got.shape != expected.shape:
        detail = f"output shape {got.shape} but expected {expected.shape}"
        return SelfTestResult(False, float("inf"), 0.0, atol, n, detail)
    diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
    agreement = float(np.mean(got.argmax(axis=1) == labels)) if n else 1.0
    passed = bool(np.isfinite(diff) and diff <= atol)
    detail = f"max |diff| {diff:.3g} {'<=' if passed else '>'} atol {atol:g}"
    return SelfTestResult(passed, diff, agreement, atol, n, detail)
