"""A site's answer to a federated artifact job: counts over its held-out data, nothing else.

The coordinator sends candidate edge artifacts (as bytes) and the checkpoint they were
exported from (``evaluate``), or an fp32 model and histogram bins (``histogram``). The
site runs each artifact with the torch-free device runtime (``fedge.edge.device.runtime``,
the code a device runs) on its local held-out split, the same split training held out,
and replies with one flat count vector (``fedge.shared.federated_counts``): examples,
correct predictions and top-1 agreements with the fp32 PyTorch model per artifact,
optionally confusion matrices. A histogram job measures the fp32 model on (up to 2048
examples of) the training split instead and returns ``site_histograms``' bin counts. No
logits, no per-example values, no site name leave the site. Everything the coordinator
chose (sizes, names, counts of arrays, the job itself) is bounded and checked before
anything is written or run; a check that fails refuses the job with a clear reason, which
reaches the server as a failed reply.

No Flower imports: ``fedge.client.app`` unpacks the message and calls ``answer``.
"""

import hashlib
import json
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import federated_counts as fc
from fedge.shared import records
from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError, DataError

log = logging.getLogger(__name__)
MAX_MANIFEST_BYTES = 1 << 20
# Examples of its training split a site measures activation histograms on (a time bound).
MAX_CALIBRATION_EXAMPLES = 2048


def answer(
    cfg: RunConfig, node_config: dict[str, Any], arrays: list[np.ndarray], config: dict[str, Any]
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """Answer one artifact job: the encoded counts, weight 1, no metrics (see the module doc).

    Raises
    ------
    ConfigError
        The job or its payload breaks a bound or does not match the run.
    DataError
        The site has no data, or too much for the exact encoding.
    """
    job = fc.ArtifactJob.from_json(str(config.get(records.CFG_ARTIFACT_JOB, "")))
    payload = _checked_payload(job, arrays)
    data = _site_data(cfg, node_config)
    if job.kind == "evaluate":
        if len(data.y_eval) == 0:
            raise DataError("this site has no held-out examples to evaluate on")
        counts = evaluate_counts(cfg, job, payload, data.x_eval, data.y_eval)
    else:
        # Calibration sees the training split (as central calibration sees a training-side
        # split), capped; the held-out split stays for judging the calibrated model.
        x = data.x_train[:MAX_CALIBRATION_EXAMPLES]
        if len(x) == 0:
            raise DataError("this site has no training examples to calibrate on")
        counts = histogram_counts(job, payload[0], x)
    try:
        encoded = fc.encode(counts, job.digits)
    except ValueError as e:
        raise DataError(f"this site's counts do not fit the job's encoding: {e}") from e
    # Weight 1: SecAgg+ then averages plainly, and no example count leaves the site alone.
    return [encoded], 1, {}


def _checked_payload(job: fc.ArtifactJob, arrays: list[np.ndarray]) -> list[bytes]:
    """The job's byte strings, once their number, type and total size are within bounds."""
    if len(arrays) != job.payload_arrays:
        raise ConfigError(
            f"artifact job refused: {len(arrays)} arrays sent, the job needs {job.payload_arrays}"
        )
    total = 0
    out = []
    for array in arrays:
        a = np.asarray(array)
        if a.dtype != np.uint8 or a.ndim != 1:
            raise ConfigError("artifact job refused: payload arrays must be flat uint8")
        total += a.nbytes
        if total > fc.MAX_PAYLOAD_BYTES:
            raise ConfigError(f"artifact job refused: payload over {fc.MAX_PAYLOAD_BYTES} bytes")
        out.append(a.tobytes())
    return out


def _site_data(cfg: RunConfig, node_config: dict[str, Any]) -> Any:
    """This site's data split as training split it (same seed, same data, same held-out part)."""
    from fedge.client.site import _simulation_data, site_data

    data_spec = str(node_config.get(records.NODE_DATA, "")) or _simulation_data(cfg, node_config)
    label_column = str(node_config.get(records.NODE_LABEL_COLUMN, cfg.label_column))
    data, _ = site_data(cfg, data_spec, label_column)
    return data


def evaluate_counts(
    cfg: RunConfig, job: fc.ArtifactJob, payload: list[bytes], x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Run PyTorch's fp32 model and every artifact on ``x``; count, per artifact, what matched.

    ``payload`` is the bundle's manifest, the checkpoint file, then the artifacts in the
    job's order. An artifact the runtime cannot load or run, or whose output has the wrong
    shape, counts no correct prediction and no agreement: it fails the gate, as it should.
    """
    from fedge.edge.device.runtime import load_artifact

    manifest = _manifest(payload[0], cfg, job)
    k = job.classes
    if y.min() < 0 or y.max() >= k:
        raise DataError(f"this site's labels fall outside the model's {k} classes")
    with tempfile.TemporaryDirectory(prefix="fedge-artifact-job-") as tmp:
        work = Path(tmp)
        reference = _reference_logits(cfg, payload[1], work, x)
        if reference.shape != (len(y), k):
            raise ConfigError("artifact job refused: the checkpoint's outputs do not fit the job")
        ref_top1 = reference.argmax(1)
        per_artifact = []
        for name, content in zip(job.artifacts, payload[2:], strict=True):
            entry = _entry(manifest, name, content)
            (work / name).write_bytes(content)
            try:
                with load_artifact(work, manifest, replace(entry, file=name)) as model:
                    logits = np.asarray(model.predict(np.ascontiguousarray(x, np.float32)).logits)
                if logits.shape != (len(y), k) or not np.all(np.isfinite(logits)):
                    raise ValueError(f"output shape {logits.shape}")
                predicted = logits.argmax(1)
            except Exception as e:  # the runtimes raise their own types: the artifact fails
                log.warning("artifact %s could not run here: %s", name, str(e)[:200])
                per_artifact.append((0, 0, np.zeros((k, k), np.int64) if job.confusion else None))
                continue
            confusion = None
            if job.confusion:
                confusion = np.bincount(y * k + predicted, minlength=k * k).reshape(k, k)
            per_artifact.append(
                (int(np.sum(predicted == y)), int(np.sum(predicted == ref_top1)), confusion)
            )
    return fc.evaluation_vector(job, len(y), int(np.sum(ref_top1 == y)), per_artifact)


def _manifest(content: bytes, cfg: RunConfig, job: fc.ArtifactJob) -> Any:
    """The bundle manifest that describes the artifacts (I/O layout), checked against the run."""
    from fedge.shared.bundle import Manifest
    from fedge.shared.errors import BundleError

    if len(content) > MAX_MANIFEST_BYTES:
        raise ConfigError("artifact job refused: manifest too large")
    try:
        data = json.loads(content.decode("utf-8"))
        manifest = Manifest.from_dict(data if isinstance(data, dict) else {})
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, BundleError) as e:
        raise ConfigError(f"artifact job refused: bad manifest ({str(e)[:200]})") from e
    if manifest.task.name != cfg.task or len(manifest.labels) != job.classes:
        raise ConfigError("artifact job refused: the artifacts are not for this run's task")
    return manifest


def _entry(manifest: Any, name: str, content: bytes) -> Any:
    """The manifest's entry for artifact ``name``, once the bytes match its hash and size."""
    for entry in manifest.artifacts:
        if Path(entry.file).name == name:
            digest = hashlib.sha256(content).hexdigest()
            if entry.sha256 != digest or entry.size != len(content):
                raise ConfigError(f"artifact job refused: {name} does not match its manifest")
            return entry
    raise ConfigError(f"artifact job refused: {name} is not in the manifest")


def _reference_logits(cfg: RunConfig, checkpoint: bytes, work: Path, x: np.ndarray) -> np.ndarray:
    """The fp32 PyTorch model's logits, rebuilt from the checkpoint as export rebuilds it."""
    from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint
    from fedge.shared.ml.training import predict_logits

    path = work / "model.safetensors"
    path.write_bytes(checkpoint)
    ckpt = load_checkpoint(path)
    if ckpt.task.name != cfg.task or ckpt.model != cfg.model:
        raise ConfigError("artifact job refused: the checkpoint is not this run's model")
    model = load_model_from_checkpoint(ckpt)
    return predict_logits(model, x).astype(np.float32)


def histogram_counts(job: fc.ArtifactJob, model: bytes, x: np.ndarray) -> np.ndarray:
    """Activation histograms of the fp32 model over this site's data (one flat count vector)."""
    from fedge.shared.activation_histograms import BinSpec, site_histograms

    spec = BinSpec.from_json(job.bin_spec)
    if spec.total_bins != job.total_bins:
        raise ConfigError("artifact job refused: the bin spec does not match the job")
    counts = np.asarray(site_histograms(model, job.fmt, np.ascontiguousarray(x, np.float32), spec))
    if counts.shape != (job.total_bins,):
        raise ValueError(f"site_histograms gave {counts.shape}, expected ({job.total_bins},)")
    return counts.astype(np.int64)
