"""Pick the artifact to serve by measuring: the fastest one that passed validation here.

The smallest artifact is often not the fastest: on x86 CPUs without VNNI,
ONNX Runtime's dynamic int8 runs 3.9-7.7x slower than fp32, and on
MobileNetV3 even static int8 is slower (``docs/edge-serving.md``). So on
activation ``edge serve`` (and the agent, through ``choose_and_record``) loads
every artifact that passed export's accuracy gate and runs on this device,
refuses any that fails its self-test here, times each on one example in short
interleaved rounds (a bounded warm-up and time budget), and serves the fastest.
The choice is recorded as JSON next to the agent's versions, so every serving
worker and the agent's status report see the same one.
"""

import json
import logging
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.edge.device.runtime import EdgeModel, runnable_artifacts, select_artifact
from fedge.shared.atomic import atomic_write_json, exclusive_lock
from fedge.shared.bundle import read_manifest, self_test_inputs, verify_bundle
from fedge.shared.errors import FedgeError

log = logging.getLogger(__name__)

CHOICE_FILE = "artifact-choice.json"


@dataclass(frozen=True)
class ArtifactChoice:
    """Which artifact of a bundle to serve, and the measurements behind it."""

    bundle_id: str
    version: str
    file: str
    reason: str  # fastest | only-candidate
    p50_ms: dict[str, float] = field(default_factory=dict)  # per measured artifact
    skipped: dict[str, str] = field(default_factory=dict)  # artifact -> why not a candidate
    filters: dict[str, str | None] = field(default_factory=dict)  # format / precision asked
    measured_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ArtifactChoice":
        return ArtifactChoice(
            bundle_id=str(data["bundle_id"]),
            version=str(data["version"]),
            file=str(data["file"]),
            reason=str(data["reason"]),
            p50_ms={str(k): float(v) for k, v in dict(data.get("p50_ms", {})).items()},
            skipped={str(k): str(v) for k, v in dict(data.get("skipped", {})).items()},
            filters=dict(data.get("filters", {})),
            measured_at=float(data.get("measured_at", 0.0)),
        )


def choose_fastest_artifact(
    bundle_dir: Path | str,
    trusted_key: Path | str,
    format: str | None = None,
    precision: str | None = None,
    *,
    threads: int | None = None,
    budget_s: float = 3.0,
    warmup: int = 3,
    max_rounds: int = 50,
) -> ArtifactChoice:
    """Measure every validated, runnable artifact of a bundle and name the fastest.

    Parameters
    ----------
    bundle_dir, trusted_key
        The bundle and the public key this device trusts.
    format, precision
        Optional filters, as for ``EdgeModel.open``.
    threads
        Runtime intra-op threads, as the server will run them.
    budget_s
        Wall-clock bound of the timed rounds (the warm-up comes first).
    warmup
        Untimed runs per artifact.
    max_rounds
        At most this many timed runs per artifact.

    Raises
    ------
    BundleError, ConfigError
        The bundle does not verify, or no artifact matches and can run here.
    """
    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir, trusted_key)
    filters = {"format": format, "precision": precision}
    select_artifact(manifest, format, precision)  # the clear error when nothing can run
    candidates = runnable_artifacts(manifest, format, precision)
    skipped = {a.file: "failed validation at export" for a in manifest.artifacts if not a.passed}
    if len(candidates) == 1:
        return ArtifactChoice(manifest.bundle_id, manifest.version, candidates[0].file,
                              "only-candidate", {}, skipped, filters, time.time())  # fmt: skip
    models: dict[str, EdgeModel] = {}
    x = np.ascontiguousarray(self_test_inputs(manifest)[:1])
    try:
        for entry in candidates:
            try:
                model = EdgeModel.open(bundle_dir, trusted_key, artifact=entry.file,
                                       threads=threads)  # fmt: skip
                result = model.self_test()
                if not result.passed:
                    model.close()
                    skipped[entry.file] = f"self-test failed here ({result.detail})"
                    continue
                for _ in range(warmup):
                    model.predict_tensor(x)
            except FedgeError as e:
                skipped[entry.file] = str(e)
                continue
            except Exception as e:  # a runtime's own error type: this one cannot serve
                skipped[entry.file] = f"{type(e).__name__}: {e}"
                continue
            models[entry.file] = model
        if not models:
            raise_none(manifest.bundle_id, skipped)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        deadline = time.monotonic() + budget_s
        for round_ in range(max_rounds):
            if round_ >= 3 and time.monotonic() > deadline:
                break
            # Rotate the order each round so drift in the machine's load hits all alike.
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                start = time.perf_counter()
                models[name].predict_tensor(x)
                times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        for model in models.values():
            model.close()
    p50 = {name: float(np.median(values)) for name, values in times.items()}
    best = min(p50, key=lambda name: (p50[name], name))
    log.info("fastest artifact of %s: %s (%s)", manifest.version, best,
             ", ".join(f"{Path(k).name} {v:.3f} ms" for k, v in p50.items()))  # fmt: skip
    return ArtifactChoice(manifest.bundle_id, manifest.version, best, "fastest", p50, skipped,
                          filters, time.time())  # fmt: skip


def raise_none(bundle_id: str, skipped: dict[str, str]) -> None:
    """No artifact can serve: say why for each."""
    from fedge.shared.errors import BundleError

    reasons = "; ".join(f"{Path(k).name}: {v}" for k, v in skipped.items())
    raise BundleError(f"bundle {bundle_id}: no artifact can serve on this device ({reasons})")


def load_choice(path: Path) -> ArtifactChoice | None:
    """The recorded choice at ``path``, or None (missing or unreadable: measure again)."""
    try:
        return ArtifactChoice.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _locked(path: Path) -> AbstractContextManager[None]:
    """One measurer at a time: serving workers that start together wait for the first."""
    return exclusive_lock(path)


def choose_and_record(
    bundle_dir: Path | str,
    trusted_key: Path | str,
    record: Path | str,
    format: str | None = None,
    precision: str | None = None,
    **measure: Any,
) -> ArtifactChoice:
    """The recorded choice for this bundle and filters, or measure now and record it.

    The agent calls this after activating a version (``record`` =
    ``DIR/artifact-choice.json``); ``edge serve --agent-dir DIR`` then reuses it
    instead of measuring again, and so does every serving worker.

    Parameters
    ----------
    bundle_dir, trusted_key
        The bundle and the public key this device trusts.
    record
        The JSON file holding the choice (written atomically).
    format, precision
        Optional filters, as for ``EdgeModel.open``.
    **measure
        Passed to ``choose_fastest_artifact`` (``threads``, ``budget_s``, ...).
    """
    record = Path(record)
    bundle_id = read_manifest(bundle_dir).bundle_id
    filters = {"format": format, "precision": precision}
    with _locked(record.with_name(f".{record.name}.lock")):
        known = load_choice(record)
        if known is not None and known.bundle_id == bundle_id and known.filters == filters:
            return known
        choice = choose_fastest_artifact(bundle_dir, trusted_key, format, precision, **measure)
        atomic_write_json(record, choice.to_dict())
        return choice
