"""Build tiny signed bundles for the edge tests without torch.

A "linear classifier" (flatten -> x @ W + b) is written as ONNX with
``onnx.helper`` and as TFLite with LiteRT's flatbuffer schema, so the expected
logits are plain numpy and every runtime result can be checked against them.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.shared import bundle, signing
from fedge.shared.tasks import ImagePreprocessing, TabularPreprocessing, TaskSpec


def digits_task() -> TaskSpec:
    """An 8x8 grayscale, 10-class image task (like sklearn's digits)."""
    pre = ImagePreprocessing(size=8, channels=1, mean=(0.5,), std=(0.5,), channel_order="L")
    return TaskSpec("digits", tuple(str(i) for i in range(10)), pre)


def rgb_task() -> TaskSpec:
    """A 4x4 RGB, 3-class image task (to exercise NCHW <-> NHWC)."""
    pre = ImagePreprocessing(size=4, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    return TaskSpec("colours", ("red", "green", "blue"), pre)


def tabular_task() -> TaskSpec:
    """Three named columns, two classes."""
    pre = TabularPreprocessing(columns=("a", "b", "c"), mean=(1.0, 2.0, 3.0), std=(2.0, 1.0, 0.5))
    return TaskSpec("table", ("no", "yes"), pre)


@dataclass(frozen=True)
class Linear:
    """logits = flatten(x) @ w + b, for inputs shaped ``(N, *task.input_shape)``."""

    w: np.ndarray  # (F, K)
    b: np.ndarray  # (K,)

    @staticmethod
    def for_task(task: TaskSpec, seed: int = 0) -> "Linear":
        rng = np.random.default_rng(seed)
        features = int(np.prod(task.input_shape))
        w = rng.standard_normal((features, task.num_classes)).astype(np.float32)
        b = rng.standard_normal(task.num_classes).astype(np.float32)
        return Linear(w, b)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1) @ self.w + self.b).astype(np.float32)


def write_onnx(
    path: Path, model: Linear, input_shape: Sequence[int], extra_fp32: int = 0, slow_ops: int = 0
) -> None:
    """ONNX Flatten -> MatMul -> Add with a free batch dimension.

    ``extra_fp32`` adds an unused float initializer of that many values, to make a
    file bigger (artifact selection tests compare sizes). ``slow_ops`` chains that
    many extra nodes in front, alternately ``Mul(x, 2)`` and ``Mul(x, 0.5)`` (exact in
    float, and not folded away by ONNX Runtime): a small file that runs slower
    (artifact selection by speed).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(model.w, "W"), numpy_helper.from_array(model.b, "B")]
    if extra_fp32:
        inits.append(numpy_helper.from_array(np.ones(extra_fp32, np.float32), "padding"))
    slow = []
    source = "input"
    if slow_ops:
        inits.append(numpy_helper.from_array(np.full(1, 2.0, np.float32), "two"))
        inits.append(numpy_helper.from_array(np.full(1, 0.5, np.float32), "half"))
        for i in range(slow_ops):
            factor = "two" if i % 2 == 0 else "half"
            slow.append(helper.make_node("Mul", [source, factor], [f"slow{i}"]))
            source = f"slow{i}"
    graph = helper.make_graph(
        [
            *slow,
            helper.make_node("Flatten", [source], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "B"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", model.w.shape[1]])],
        initializer=inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, str(path))


def write_tflite(
    path: Path, model: Linear, shape: Sequence[int], batch: int | None, layout: str = "NCHW"
) -> list[int]:
    """TFLite FULLY_CONNECTED over ``(batch, *shape)`` (``batch=None``: dynamic).

    ``shape`` is the task's (C, H, W) or (F,); with ``layout="NHWC"`` the input is
    (H, W, C) and the weight rows are permuted, so the model computes the same
    function on transposed input. Returns the per-example input shape.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    w, input_shape = model.w, list(shape)
    if layout == "NHWC":
        c, h, wd = shape
        w = w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(h * wd * c, -1)
        input_shape = [h, wd, c]
    classes = w.shape[1]

    def tensor(name: str, shape: list[int], buffer: int, sig: list[int] | None = None) -> object:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, s.TensorType.FLOAT32, buffer
        t.shapeSignature = sig
        return t

    def buf(data: bytes | None) -> object:
        b = s.BufferT()
        b.data = None if data is None else np.frombuffer(data, np.uint8)
        return b

    first = 1 if batch is None else batch
    sig = [-1, *input_shape] if batch is None else None
    out_sig = [-1, classes] if batch is None else None
    weights = np.ascontiguousarray(w.T, dtype=np.float32)  # TFLite FC wants (K, F)
    sub = s.SubGraphT()
    sub.tensors = [
        tensor("input", [first, *input_shape], 0, sig),
        tensor("W", list(weights.shape), 1),
        tensor("B", [classes], 2),
        tensor("logits", [first, classes], 0, out_sig),
    ]
    sub.inputs, sub.outputs = [0], [3]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = s.FullyConnectedOptionsT()
    sub.operators = [op]
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    tfl = s.ModelT()
    tfl.version, tfl.operatorCodes, tfl.subgraphs = 3, [code], [sub]
    tfl.buffers = [buf(None), buf(weights.tobytes()), buf(model.b.astype(np.float32).tobytes())]
    builder = flatbuffers.Builder(1024)
    builder.Finish(tfl.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return input_shape


@dataclass(frozen=True)
class ArtifactPlan:
    """One artifact to put in a test bundle."""

    name: str  # file name under artifacts/
    format: str = "onnx"
    precision: str = "fp32"
    layout: str = "NCHW"  # NHWC: TFLite only
    batch: int | None = None  # fixed TFLite batch; None = dynamic
    extra_fp32: int = 0
    passed: bool = True
    slow_ops: int = 0


DEFAULT_PLANS = (ArtifactPlan("model-fp32.onnx"),)


def make_keys(directory: Path) -> tuple[Path, Path]:
    """A fresh signing key pair; returns (private path, public path)."""
    private = directory / "signing.key"
    return private, signing.generate_signing_key(private)


def make_bundle(
    directory: Path,
    private_key: Path,
    task: TaskSpec | None = None,
    plans: Sequence[ArtifactPlan] = DEFAULT_PLANS,
    seed: int = 0,
    self_test_examples: int = 4,
    corrupt_expectation: str | None = None,
) -> Path:
    """Write and sign a bundle at ``directory`` with one linear model in every artifact."""
    task = task or digits_task()
    model = Linear.for_task(task, seed)
    shape = list(task.input_shape)
    layout = "NCHW" if len(shape) == 3 else "NF"
    (directory / "artifacts").mkdir(parents=True)
    entries = []
    for plan in plans:
        path = directory / "artifacts" / plan.name
        if plan.format == "onnx":
            write_onnx(path, model, shape, plan.extra_fp32, plan.slow_ops)
            in_shape = shape
        else:
            in_shape = write_tflite(path, model, shape, plan.batch, plan.layout)
        batch = -1 if plan.batch is None else plan.batch
        entries.append({
            "file": f"artifacts/{plan.name}",
            "format": plan.format,
            "precision": plan.precision,
            "quantization": "none" if plan.precision == "fp32" else "dynamic",
            "inputs": [{"name": "input", "shape": [batch, *in_shape], "dtype": "float32",
                        "layout": plan.layout if len(shape) == 3 else "NF"}],
            "outputs": [{"name": "logits", "shape": [batch, task.num_classes],
                         "dtype": "float32"}],
            "validation": {"passed": plan.passed, "max_abs_diff": 0.0, "top1_agreement": 1.0},
            "tolerance": {"atol": 1e-4},
        })  # fmt: skip
    (directory / "model_card.json").write_text('{"model": "linear", "note": "test"}\n')
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((self_test_examples, *shape)).astype(np.float32)
    logits = model(x)
    expected = {e["file"]: logits for e in entries}
    if corrupt_expectation:
        expected[corrupt_expectation] = logits + 1.0
    manifest = {
        "version": "test-1",
        "task": task.to_dict(),
        "labels": list(task.classes),
        "inputs": [{"name": "input", "shape": [-1, *shape], "dtype": "float32", "layout": layout}],
        "outputs": [{"name": "logits", "shape": [-1, task.num_classes], "dtype": "float32"}],
        "artifacts": entries,
        "self_test": bundle.make_self_test(x, expected, logits.argmax(axis=1)),
        "privacy": None,
    }
    bundle.write_signed_manifest(directory, manifest, signing.load_private_key(private_key))
    return directory
