"""Run a verified bundle's model on a device with onnxruntime or LiteRT (no torch, no flwr).

``EdgeModel.open`` verifies the bundle against the one trusted key, picks an
artifact, and loads it once; ``predict_*`` may then be called many times and
from many threads (onnxruntime sessions are thread-safe; a LiteRT interpreter
is not, so it runs under a lock). Inputs are preprocessed with
``fedge.shared.preprocess`` exactly as training did.
"""

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedge.shared.bundle import (
    ARTIFACT_FORMATS,
    ArtifactEntry,
    Manifest,
    SelfTestResult,
    TensorSpec,
    run_self_test,
    verify_bundle,
)
from fedge.shared.errors import BundleError, ConfigError, DataError, ModelError
from fedge.shared.preprocess import prepare
from fedge.shared.signing import Ed25519PublicKey
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
_INSTALL_HINT = 'install the edge runtime: pip install "fedge[edge]"'


@dataclass(frozen=True)
class Prediction:
    """Top-1 results for a batch: label, class index and softmax score per input."""

    labels: list[str]
    indices: np.ndarray  # (N,) int64
    scores: np.ndarray  # (N,) float32, softmax probability of the top class
    logits: np.ndarray  # (N, K) float32

    def probabilities(self) -> np.ndarray:
        """Softmax over classes, (N, K)."""
        return softmax(self.logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of (N, K) logits, stable for large values."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def available_formats() -> tuple[str, ...]:
    """Artifact formats whose runtime can be imported here (checked without importing it)."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnx")
    if any(importlib.util.find_spec(m) is not None for m in ("ai_edge_litert", "tflite_runtime")):
        found.append("tflite")
    return tuple(found)


def _matches_precision(entry: ArtifactEntry, precision: str) -> bool:
    return entry.precision == precision or entry.precision.startswith(precision)


def runnable_artifacts(
    manifest: Manifest,
    format: str | None = None,
    precision: str | None = None,
    available: Sequence[str] | None = None,
) -> list[ArtifactEntry]:
    """Artifacts that passed validation, match the filters and have a runtime here."""
    available = available_formats() if available is None else tuple(available)
    return [
        a
        for a in manifest.artifacts
        if a.passed
        and a.format in available
        and (format is None or a.format == format)
        and (precision is None or _matches_precision(a, precision))
    ]


def select_artifact(
    manifest: Manifest,
    format: str | None = None,
    precision: str | None = None,
    artifact: str | None = None,
    available: Sequence[str] | None = None,
) -> ArtifactEntry:
    """Pick the artifact to run: the smallest that passed validation, matches, and can run here.

    Parameters
    ----------
    manifest
        The verified manifest.
    format, precision
        Optional filters: ``"onnx"``/``"tflite"`` and ``"fp32"``/``"int8"``.
    artifact
        An exact artifact file (``artifacts/model-int8-static.onnx``) or its base name.
    available
        Formats with a runtime on this device (default: ``available_formats()``).

    Raises
    ------
    ConfigError
        An unknown format/precision, or no runtime installed for the matching artifacts.
    BundleError
        No artifact in the bundle matches.
    """
    if format is not None and format not in ARTIFACT_FORMATS:
        raise ConfigError(f"format {format!r} is not one of {', '.join(ARTIFACT_FORMATS)}")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    candidates = [
        a
        for a in manifest.artifacts
        if a.passed
        and (artifact is None or artifact in (a.file, Path(a.file).name))
        and (format is None or a.format == format)
        and (precision is None or _matches_precision(a, precision))
    ]
    if not candidates:
        wanted = ", ".join(
            f"{k}={v}"
            for k, v in (("artifact", artifact), ("format", format), ("precision", precision))
            if v
        )
        have = ", ".join(
            f"{a.file}{'' if a.passed else ' (failed validation)'}" for a in manifest.artifacts
        )
        raise BundleError(
            f"bundle {manifest.bundle_id} has no validated artifact with {wanted or 'any format'} "
            f"(it has: {have})"
        )
    available = available_formats() if available is None else tuple(available)
    runnable = [a for a in candidates if a.format in available]
    if not runnable:
        missing = sorted({a.format for a in candidates})
        raise ConfigError(
            f"no runtime for {'/'.join(missing)} artifacts is installed on this device",
            hint=_INSTALL_HINT,
        )
    return min(runnable, key=lambda a: (a.size, a.file))


def _is_nhwc(canonical: TensorSpec, actual: TensorSpec) -> bool:
    """Whether the artifact takes channels-last input while the task's input is NCHW."""
    if actual.layout is not None:
        return actual.layout == "NHWC" and canonical.layout != "NHWC"
    c, a = canonical.shape, actual.shape
    return len(c) == 4 and len(a) == 4 and a[1:] == (c[2], c[3], c[1]) and a[1:] != c[1:]


class _Backend(Protocol):
    def run(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class _OnnxBackend:
    """onnxruntime session: ``run`` is safe to call from many threads at once."""

    def __init__(self, path: Path, providers: Sequence[str] | None, threads: int | None) -> None:
        import onnxruntime as ort

        if os.environ.get("ORT_DISABLE_TELEMETRY", "1") == "1":
            ort.disable_telemetry_events()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session: Any = ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]

    def run(self, x: np.ndarray) -> np.ndarray:
        session = self.session  # a call in flight keeps its session alive through close()
        if session is None:
            raise ModelError("this model was closed; open the bundle again")
        return session.run(self.output_names, {self.input_name: x})[0]

    def close(self) -> None:
        self.session = None


def _litert_interpreter(path: Path, threads: int | None) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        # The deprecated predecessor; works only with numpy 1 and older converter output.
        from tflite_runtime.interpreter import Interpreter
    return Interpreter(model_path=str(path), num_threads=threads)


class _TFLiteBackend:
    """LiteRT interpreter: one call at a time (lock), fixed batches looped, int8 I/O scaled."""

    def __init__(self, path: Path, threads: int | None) -> None:
        self.interpreter: Any = _litert_interpreter(path, threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        signature = self.input.get("shape_signature", self.input["shape"])
        self.dynamic_batch = int(signature[0]) == -1
        self.batch = int(self.input["shape"][0])
        self.lock = threading.Lock()

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype == np.float32:
            return x
        scale, zero = self.input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if y.dtype == np.float32:
            return y
        scale, zero = self.output["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def run(self, x: np.ndarray) -> np.ndarray:
        x = self._quantize(x)
        n = x.shape[0]
        with self.lock:
            if self.interpreter is None:
                raise ModelError("this model was closed; open the bundle again")
            if self.dynamic_batch:
                if self.batch != n:
                    self.interpreter.resize_tensor_input(self.input["index"], list(x.shape))
                    self.interpreter.allocate_tensors()
                    self.batch = n
                return self._dequantize(self._invoke(x))
            # A fixed batch (usually 1): run in chunks of it, padding the last one.
            outputs = []
            for start in range(0, n, self.batch):
                chunk = x[start : start + self.batch]
                rows = chunk.shape[0]
                if rows < self.batch:
                    pad = np.zeros((self.batch - rows, *chunk.shape[1:]), dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                outputs.append(self._invoke(np.ascontiguousarray(chunk))[:rows])
            return self._dequantize(np.concatenate(outputs))

    def close(self) -> None:
        with self.lock:  # never pull the interpreter from under a running call
            self.interpreter = None


class EdgeModel:
    """A verified bundle's model, loaded once, ready for many (concurrent) predictions.

    Use ``EdgeModel.open``; the constructor takes already verified parts.
    """

    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest,
        artifact: ArtifactEntry,
        backend: _Backend,
        load_seconds: float = 0.0,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.artifact = artifact
        self.load_seconds = load_seconds
        self._backend = backend
        self._input = manifest.inputs[0]
        self._dtype = np.dtype(self._input.dtype)
        # Dimensions to check on every call, precomputed: (axis, size); the batch is free.
        self._fixed_dims = tuple((i, d) for i, d in enumerate(self._input.shape) if i and d >= 0)
        self._ndim = len(self._input.shape)
        self._nhwc = _is_nhwc(self._input, artifact.inputs[0]) if artifact.inputs else False

    @classmethod
    def open(
        cls,
        bundle_dir: Path | str,
        trusted_key: Path | str | Ed25519PublicKey,
        format: str | None = None,
        precision: str | None = None,
        *,
        artifact: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> "EdgeModel":
        """Verify a bundle, pick an artifact and load it.

        Parameters
        ----------
        bundle_dir
            The bundle directory.
        trusted_key
            The public key this device trusts (a ``signing.pub`` path or the key).
        format, precision
            Optional artifact filters (``onnx``/``tflite``, ``fp32``/``int8``); by default
            the smallest validated artifact whose runtime is installed.
        artifact
            Run exactly this artifact file (or base name) instead.
        providers
            onnxruntime execution providers (default ``["CPUExecutionProvider"]``).
        threads
            Intra-op threads for the runtime (default: the runtime's choice).

        Raises
        ------
        BundleError
            The bundle fails verification, or no artifact matches.
        SecurityError
            The trusted key file is missing or unreadable.
        ConfigError, ModelError
            No runtime installed; the runtime cannot load the artifact.
        """
        bundle_dir = Path(bundle_dir)
        manifest = verify_bundle(bundle_dir, trusted_key)
        if not manifest.inputs:
            raise BundleError(f"bundle {bundle_dir}: manifest.json declares no model input")
        entry = select_artifact(manifest, format, precision, artifact)
        path = bundle_dir / entry.file
        start = time.perf_counter()
        try:
            backend: _Backend = (
                _OnnxBackend(path, providers, threads)
                if entry.format == "onnx"
                else _TFLiteBackend(path, threads)
            )
        except ImportError as e:
            raise ConfigError(
                f"cannot import the {entry.format} runtime: {e}", _INSTALL_HINT
            ) from e
        except Exception as e:  # the runtimes raise their own exception types
            raise ModelError(f"{entry.format} runtime cannot load {entry.file}: {e}") from e
        load_seconds = time.perf_counter() - start
        log.info("loaded %s from bundle %s in %.3f s", entry.file, manifest.bundle_id, load_seconds)
        return cls(bundle_dir, manifest, entry, backend, load_seconds)

    @property
    def task(self) -> TaskSpec:
        return self.manifest.task

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def dynamic_batch(self) -> bool:
        """Whether the artifact takes any batch size in one call (micro-batching helps)."""
        spec = self.artifact.inputs[0] if self.artifact.inputs else self._input
        return not spec.shape or spec.shape[0] < 0

    @property
    def input_spec(self) -> TensorSpec:
        """The model input every ``predict_tensor`` call must match."""
        return self._input

    def _check(self, x: np.ndarray) -> None:
        if not isinstance(x, np.ndarray):
            raise DataError(f"input is a {type(x).__name__}, not a numpy array")
        shape = x.shape
        if (
            x.dtype != self._dtype
            or x.ndim != self._ndim
            or any(shape[i] != d for i, d in self._fixed_dims)
            or shape[0] == 0
        ):
            raise DataError(
                f"input has shape {shape} {x.dtype} but the model expects {self._input.describe()}"
            )

    def predict_tensor(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 for preprocessed inputs ``x`` shaped like ``input_spec``.

        Raises
        ------
        DataError
            If ``x`` has the wrong shape or dtype (no silent casting).
        """
        self._check(x)
        if self._nhwc:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return self._backend.run(x)

    def predict(self, x: np.ndarray, batch_size: int = 256) -> Prediction:
        """Top-1 label and score per preprocessed input, run in batches of ``batch_size``."""
        self._check(x)
        if x.shape[0] <= batch_size:
            logits = self.predict_tensor(x)
        else:
            chunks = [
                self.predict_tensor(x[i : i + batch_size]) for i in range(0, len(x), batch_size)
            ]
            logits = np.concatenate(chunks)
        logits = np.asarray(logits, dtype=np.float32)
        indices = logits.argmax(axis=1)
        scores = softmax(logits)[np.arange(len(indices)), indices].astype(np.float32)
        labels = [self.labels[i] if i < len(self.labels) else str(i) for i in indices]
        return Prediction(labels, indices, scores, logits)

    def predict_raw(self, raw_inputs: Sequence[np.ndarray] | np.ndarray) -> Prediction:
        """Preprocess raw examples as training did, then predict.

        ``raw_inputs``: uint8 images HxW or HxWxC (any size: they are resized) for an
        image task; rows of floats in the task's column order for a tabular task.
        """
        if len(raw_inputs) == 0:
            raise DataError("no inputs to predict")
        return self.predict(prepare(raw_inputs, self.task.preprocessing))

    def self_test(self) -> SelfTestResult:
        """Run the bundle's self-test inputs through this artifact and compare with export's."""
        return run_self_test(self.manifest, self.artifact, self.predict_tensor)

    def describe(self) -> dict[str, Any]:
        """Facts about what is loaded (for logs, ``--json`` output and health endpoints)."""
        return {
            "bundle_id": self.manifest.bundle_id,
            "version": self.manifest.version,
            "task": self.task.name,
            "artifact": self.artifact.file,
            "format": self.artifact.format,
            "precision": self.artifact.precision,
            "quantization": self.artifact.quantization,
            "size": self.artifact.size,
        }

    def close(self) -> None:
        """Release the session/interpreter."""
        self._backend.close()

    def __enter__(self) -> "EdgeModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_artifact(
    bundle_dir: Path | str,
    manifest: Manifest,
    entry: ArtifactEntry,
    *,
    threads: int | None = None,
) -> EdgeModel:
    """Load one artifact of an already verified manifest, whether or not it passed validation.

    Export's validation runs each artifact through this, so that what it
    measures, and the self-test logits it records, are what a device computes
    (NHWC input, fixed or dynamic batch, int8 I/O scaling). A device itself goes
    through ``EdgeModel.open``, which runs only artifacts that passed.

    Parameters
    ----------
    bundle_dir
        The bundle directory ``manifest`` was verified from (``verify_bundle``).
    manifest, entry
        The verified manifest and the artifact in it to load.
    threads
        Intra-op threads for the runtime (default: the runtime's choice).

    Raises
    ------
    ConfigError, ModelError
        No runtime installed; the runtime cannot load the artifact.
    """
    path = Path(bundle_dir) / entry.file
    try:
        backend: _Backend = (
            _OnnxBackend(path, None, threads)
            if entry.format == "onnx"
            else _TFLiteBackend(path, threads)
        )
    except ImportError as e:
        raise ConfigError(f"cannot import the {entry.format} runtime: {e}", _INSTALL_HINT) from e
    except Exception as e:  # the runtimes raise their own exception types
        raise ModelError(f"{entry.format} runtime cannot load {entry.file}: {e}") from e
    return EdgeModel(Path(bundle_dir), manifest, entry, backend)
