"""Package a model trained elsewhere (ONNX or TFLite) as a signed fedge bundle. Torch-free.

``create_bundle`` inspects the model's single input and output, refuses what the
device runtime cannot feed or read, writes the artifact, manifest and a model
card that says plainly there is no federated training record, and computes the
self-test expectations by running the model through the device runtime itself
(``EdgeModel``) on the operator's inputs. It signs with the operator key, then
opens the finished bundle as a device would and runs its self-test before it is
moved into place. Registry, agent and serving then treat it like any bundle.
"""

import logging
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import bundle, signing
from fedge.shared.atomic import atomic_write_json, fsync_tree
from fedge.shared.errors import BundleError, ConfigError, ModelError, SecurityError
from fedge.shared.fleet_protocol import is_version
from fedge.shared.tasks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessing,
    Preprocessing,
    TabularPreprocessing,
    TaskSpec,
)

log = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
PRESETS = ("none", "imagenet")
MAX_SELF_TEST = 64
DEFAULT_SELF_TEST = 8
DEFAULT_ATOL = {"onnx": 1e-4, "tflite": 1e-3}
_TASK_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ModelIO:
    """A model's one input and one output as the runtime sees them (-1: a free dimension)."""

    input: bundle.TensorSpec
    output: bundle.TensorSpec
    input_quantized: bool = False


def inspect_model(model: Path) -> tuple[str, ModelIO]:
    """The format and the single input/output of ``model``.

    Raises
    ------
    ConfigError
        Unknown file type, or no runtime installed for it.
    ModelError
        Unreadable, or not one input and one output of types the runtime handles.
    """
    fmt = FORMATS.get(model.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{model}: only .onnx and .tflite models can be packaged")
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist")
    try:
        io = _inspect_onnx(model) if fmt == "onnx" else _inspect_tflite(model)
    except ImportError as e:
        raise ConfigError(
            f"cannot inspect {model}: the {fmt} runtime is not installed ({e})",
            hint='pip install "fedge[edge]"',
        ) from e
    return fmt, io


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(d) if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _inspect_onnx(model: Path) -> ModelIO:
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types
        raise ModelError(f"onnxruntime cannot load {model}: {e}") from e
    inputs, outputs = session.get_inputs(), session.get_outputs()
    _one(model, "input", [i.name for i in inputs])
    _one(model, "output", [o.name for o in outputs])
    for what, tensor in (("input", inputs[0]), ("output", outputs[0])):
        if tensor.type != "tensor(float)":
            raise ModelError(
                f"{model}: the {what} {tensor.name!r} is {tensor.type}; the device runtime feeds "
                "and reads float32 tensors only",
                hint="export the model with a float32 input and float32 logits",
            )
    spec_in = bundle.TensorSpec(inputs[0].name, _dims(inputs[0].shape), "float32")
    spec_out = bundle.TensorSpec(outputs[0].name, _dims(outputs[0].shape), "float32")
    if spec_in.shape and spec_in.shape[0] != -1:
        raise ModelError(
            f"{model}: the input's batch dimension is fixed at {spec_in.shape[0]}; the runtime "
            "feeds batches to ONNX models",
            hint="export with a dynamic batch axis (torch.onnx.export(..., dynamic_axes=...))",
        )
    return ModelIO(spec_in, spec_out)


def _inspect_tflite(model: Path) -> ModelIO:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(model))
    except Exception as e:  # LiteRT raises its own types
        raise ModelError(f"LiteRT cannot load {model}: {e}") from e
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    _one(model, "input", [i["name"] for i in inputs])
    _one(model, "output", [o["name"] for o in outputs])
    quantized = False
    for what, detail in (("input", inputs[0]), ("output", outputs[0])):
        dtype = np.dtype(detail["dtype"])
        if dtype == np.float32:
            continue
        scale, _ = detail.get("quantization", (0.0, 0))
        if dtype in (np.int8, np.uint8) and scale:
            quantized = quantized or what == "input"
            continue
        raise ModelError(
            f"{model}: the {what} {detail['name']!r} is {dtype.name}; the device runtime handles "
            "float32, or int8/uint8 with quantization parameters"
        )

    def spec(detail: dict[str, Any]) -> bundle.TensorSpec:
        shape = detail.get("shape_signature")
        shape = detail["shape"] if shape is None or len(shape) == 0 else shape
        return bundle.TensorSpec(
            str(detail["name"]), tuple(int(d) for d in shape), np.dtype(detail["dtype"]).name
        )

    return ModelIO(spec(inputs[0]), spec(outputs[0]), quantized)


def _one(model: Path, what: str, names: list[str]) -> None:
    if len(names) != 1:
        raise ModelError(
            f"{model} has {len(names)} {what}s ({', '.join(names)[:200]}); the device runtime "
            f"runs classifiers with exactly one {what}",
            hint="export a graph with one input tensor and one logits output",
        )


def make_task(
    name: str,
    labels: Sequence[str],
    input_shape: Sequence[int],
    preprocessing: str | dict[str, Any] = "none",
) -> TaskSpec:
    """The task of a packaged model: ``input_shape`` is one example, (C, H, W) or (F,).

    ``preprocessing`` is ``"none"`` (images scaled to [0, 1]; features as given),
    ``"imagenet"`` (ImageNet mean/std, 3 channels), or the fields of fedge's
    ``ImagePreprocessing``/``TabularPreprocessing`` as a dict.

    Raises
    ------
    ConfigError
        A shape that is neither (C, H, W) with square H, W and C in 1 or 3, nor (F,);
        a preset that does not fit the shape; fewer than two labels.
    """
    labels = tuple(str(label) for label in labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ConfigError("give at least two distinct labels (one per model output)")
    shape = tuple(int(d) for d in input_shape)
    pre: Preprocessing
    if isinstance(preprocessing, dict):
        try:
            pre = TaskSpec.from_dict(
                {"name": name, "classes": list(labels), "preprocessing": preprocessing}
            ).preprocessing
        except TypeError as e:
            raise ConfigError(f"preprocessing fields are not fedge's: {e}") from e
        made = TaskSpec(name, labels, pre).input_shape
        if made != shape:
            raise ConfigError(f"the preprocessing makes {made} inputs, not {shape}")
        return TaskSpec(name, labels, pre)
    if preprocessing not in PRESETS:
        raise ConfigError(f"preprocessing {preprocessing!r} is not one of {PRESETS} or a JSON file")
    if len(shape) == 3:
        channels, height, width = shape
        if height != width or channels not in (1, 3) or height < 1:
            raise ConfigError(
                f"image input {shape}: fedge's image preprocessing makes square inputs with 1 or "
                "3 channels, (C, S, S)"
            )
        mean: tuple[float, ...]
        std: tuple[float, ...]
        if preprocessing == "imagenet":
            if channels != 3:
                raise ConfigError("imagenet preprocessing needs 3 channels")
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        pre = ImagePreprocessing(
            size=height, channels=channels, mean=mean, std=std,
            channel_order="RGB" if channels == 3 else "L",
        )  # fmt: skip
    elif len(shape) == 1 and shape[0] >= 1:
        if preprocessing != "none":
            raise ConfigError(f"{preprocessing} preprocessing is for images, not (F,) features")
        count = shape[0]
        pre = TabularPreprocessing(
            columns=tuple(f"f{i}" for i in range(count)), mean=(0.0,) * count, std=(1.0,) * count
        )
    else:
        raise ConfigError(f"input shape {shape} is neither (C, H, W) nor (F,)")
    return TaskSpec(name, labels, pre)


def _check_io(model: Path, io: ModelIO, task: TaskSpec) -> str | None:
    """Match the model's tensors to the task; return the artifact input layout."""
    example = task.input_shape
    actual = io.input.shape
    if len(actual) != len(example) + 1:
        raise ModelError(
            f"{model}: input {io.input.name!r} has shape {actual}, which does not take "
            f"(N, {', '.join(map(str, example))}) batches"
        )
    fixed = actual[1:]
    layout = "NCHW" if len(example) == 3 else "NF"
    if len(example) == 3:
        c, h, w = example
        if _fits(fixed, (c, h, w)):
            layout = "NCHW"
        elif _fits(fixed, (h, w, c)):
            layout = "NHWC"  # the runtime transposes fedge's NCHW input for it
        else:
            raise ModelError(
                f"{model}: input {io.input.name!r} has shape {actual}; it takes neither "
                f"(N, {c}, {h}, {w}) nor (N, {h}, {w}, {c})"
            )
    elif not _fits(fixed, example):
        raise ModelError(f"{model}: input shape {actual} does not take (N, {example[0]}) rows")
    out = io.output.shape
    if len(out) != 2:
        raise ModelError(
            f"{model}: output {io.output.name!r} has shape {out}; the runtime reads (N, classes) "
            "logits"
        )
    if out[1] != -1 and out[1] != task.num_classes:
        raise ModelError(
            f"{model}: the model has {out[1]} outputs but {task.num_classes} labels were given"
        )
    return layout


def _fits(actual: Sequence[int], wanted: Sequence[int]) -> bool:
    return all(a in (-1, w) for a, w in zip(actual, wanted, strict=True))


def _self_test_inputs(task: TaskSpec, path: Path | None, seed: int) -> np.ndarray:
    shape = task.input_shape
    if path is None:
        rng = np.random.default_rng(seed)
        low, high = (0.0, 1.0) if task.kind == "image" else (-2.0, 2.0)
        return rng.uniform(low, high, size=(DEFAULT_SELF_TEST, *shape)).astype(np.float32)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read self-test inputs {path}: {e}") from e
    if array.ndim == len(shape):
        array = array[None]
    if array.shape[1:] != shape or not 1 <= len(array) <= MAX_SELF_TEST:
        raise ConfigError(
            f"self-test inputs {path} have shape {array.shape}; expected (n, "
            f"{', '.join(map(str, shape))}) preprocessed examples, 1 <= n <= {MAX_SELF_TEST}"
        )
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise ConfigError(f"self-test inputs {path} must be finite numbers")
    return np.ascontiguousarray(array, dtype=np.float32)


def _load_key(key: Path | None) -> signing.Ed25519PrivateKey:
    from fedge.shared.paths import signing_key_path

    path = key if key is not None else signing_key_path()
    if not Path(path).is_file():
        raise SecurityError(
            f"no bundle signing key at {path}",
            hint="create one with `fedge keys create` (or pass --key PATH)",
        )
    return signing.load_private_key(path)


def create_bundle(
    model: Path | str,
    out_dir: Path | str,
    *,
    labels: Sequence[str],
    input_shape: Sequence[int],
    version: str,
    preprocessing: str | dict[str, Any] = "none",
    task_name: str | None = None,
    self_test: Path | str | None = None,
    signing_key: Path | None = None,
    atol: float | None = None,
    precision: str = "fp32",
    force: bool = False,
) -> bundle.Manifest:
    """Package ``model`` as a signed bundle in ``out_dir``.

    Parameters
    ----------
    model
        An ``.onnx`` (float32 input and logits, dynamic batch) or ``.tflite`` classifier.
    out_dir
        The bundle directory to write (refused if it exists, unless ``force``).
    labels
        Class names, one per model output, in output order.
    input_shape
        One preprocessed example: ``(C, H, W)`` for images, ``(F,)`` for features.
    version
        The bundle version (what the registry and devices call it).
    preprocessing
        ``"none"``, ``"imagenet"`` or fedge preprocessing fields (see ``make_task``).
    task_name
        The task's name (devices refuse a bundle for another task); default: the model's
        file name.
    self_test
        A ``.npy`` of preprocessed inputs ``(n, *input_shape)``; default: 8 seeded random ones.
    signing_key
        The operator's Ed25519 key (default ``FEDGE_HOME/keys/signing.key``).
    atol
        Self-test tolerance on each device (default 1e-4 ONNX, 1e-3 TFLite).
    precision
        ``fp32`` or ``int8``, as the model was trained/converted (recorded, not changed).
    force
        Replace an existing ``out_dir``.

    Returns
    -------
    Manifest
        The signed manifest.

    Raises
    ------
    ConfigError
        Bad options, an existing ``out_dir``, unreadable self-test inputs.
    ModelError
        A model whose inputs or outputs the device runtime cannot handle, or one that
        fails to run.
    SecurityError
        No signing key.
    """
    model, out_dir = Path(model), Path(out_dir)
    if precision not in ("fp32", "int8"):
        raise ConfigError(f"precision {precision!r} is not fp32 or int8")
    if not is_version(version):
        # The registry and devices store a version as a directory name: refuse it here, not
        # after signing, at `fedge registry publish`.
        raise ConfigError(
            f"version {version!r} is not valid: use letters, digits, '.', '_', '+' or '-' "
            "(at most 128, starting with a letter or digit)"
        )
    if atol is not None and not (math.isfinite(atol) and atol > 0):
        raise ConfigError(f"--atol must be a positive number, got {atol}")
    if out_dir.exists() and not force:
        raise ConfigError(f"{out_dir} already exists; choose another --out or pass --force")
    if out_dir.exists() and (out_dir.is_symlink() or not out_dir.is_dir()):
        raise ConfigError(f"{out_dir} is not a bundle directory; --force replaces only one")
    key = _load_key(signing_key)
    fmt, io = inspect_model(model)
    name = task_name or _TASK_RE.sub("-", model.stem).strip("-") or "model"
    task = make_task(name, labels, input_shape, preprocessing)
    layout = _check_io(model, io, task)
    inputs = _self_test_inputs(task, None if self_test is None else Path(self_test), seed=0)

    artifact = f"{bundle.ARTIFACTS_DIR}/model-{precision}.{fmt}"
    canonical_in = bundle.TensorSpec(
        "input", (-1, *task.input_shape), "float32", "NCHW" if task.kind == "image" else "NF"
    )
    canonical_out = bundle.TensorSpec("logits", (-1, task.num_classes), "float32")
    artifact_in = bundle.TensorSpec(io.input.name, io.input.shape, io.input.dtype, layout)
    entry: dict[str, Any] = {
        "file": artifact,
        "format": fmt,
        "precision": precision,
        "quantization": "unknown (packaged)" if precision == "int8" else "none",
        "inputs": [artifact_in.to_dict()],
        "outputs": [io.output.to_dict()],
        # No training framework to compare against: what is checked is that the device
        # runtime loads the model and gives finite (N, classes) logits on the inputs.
        "validation": {"passed": True, "reference": "none (model packaged from outside fedge)"},
        "tolerance": {"atol": float(atol if atol is not None else DEFAULT_ATOL[fmt])},
    }
    manifest: dict[str, Any] = {
        "version": version,
        "task": task.to_dict(),
        "labels": list(task.classes),
        "inputs": [canonical_in.to_dict()],
        "outputs": [canonical_out.to_dict()],
        "artifacts": [entry],
        "privacy": None,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (staged / bundle.ARTIFACTS_DIR).mkdir()
        shutil.copyfile(model, staged / artifact)
        atomic_write_json(staged / bundle.MODEL_CARD, _model_card(model, fmt, task, version))
        # Sign once without a self-test so the runtime opens it exactly as a device would,
        # compute the expectations with it, then sign the final manifest.
        bundle.write_signed_manifest(staged, {**manifest, "self_test": None}, key)
        expected = _run(staged, key, artifact, inputs, task)
        manifest["self_test"] = bundle.make_self_test(
            inputs, {artifact: expected}, expected.argmax(axis=1)
        )
        (staged / bundle.MANIFEST).unlink()
        (staged / bundle.SIGNATURE).unlink()
        signed = bundle.write_signed_manifest(staged, manifest, key)
        _check_self_test(staged, key)
        staged.chmod(0o755)
        fsync_tree(staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staged.rename(out_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("packaged %s as bundle %s (%s)", model, version, signed.bundle_id)
    return signed


def _run(
    staged: Path,
    key: signing.Ed25519PrivateKey,
    artifact: str,
    inputs: np.ndarray,
    task: TaskSpec,
) -> np.ndarray:
    from fedge.edge.device.runtime import EdgeModel

    try:
        with EdgeModel.open(staged, key.public_key(), artifact=artifact) as loaded:
            logits = np.asarray(loaded.predict_tensor(inputs), dtype=np.float32)
    except (ConfigError, BundleError):
        raise
    except Exception as e:  # the runtimes raise their own exception types
        raise ModelError(f"the device runtime cannot run the model: {e}") from e
    if logits.shape != (len(inputs), task.num_classes) or not np.isfinite(logits).all():
        raise ModelError(
            f"the model gave outputs of shape {logits.shape} (finite: "
            f"{bool(np.isfinite(logits).all())}); expected finite ({len(inputs)}, "
            f"{task.num_classes}) logits"
        )
    return logits


def _check_self_test(staged: Path, key: signing.Ed25519PrivateKey) -> None:
    from fedge.edge.device.runtime import EdgeModel

    with EdgeModel.open(staged, key.public_key()) as loaded:
        result = loaded.self_test()
    if not result.passed:
        raise ModelError(f"the packaged bundle fails its own self-test ({result.detail})")


def _model_card(model: Path, fmt: str, task: TaskSpec, version: str) -> dict[str, Any]:
    return {
        "packaged_with": "fedge bundle create",
        "source_model": model.name,
        "source_sha256": bundle.sha256_file(model),
        "format": fmt,
        "version": version,
        "task": task.name,
        "labels": list(task.classes),
        "training": {
            "federated": False,
            "record": None,
            "note": "trained outside fedge: there is no federated training record, no "
            "differential-privacy accounting and no evaluation by fedge for this model",
        },
        "self_test": "expected outputs computed by fedge's device runtime on the given inputs",
    }
