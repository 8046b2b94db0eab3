"""Static int8 settings per target CPU: the activation/weight types end up in the QDQ graph."""

from pathlib import Path

import numpy as np
import pytest

from fedge.edge.export.calibration import CalibrationReader
from fedge.edge.export.quantize import STATIC_TARGETS, StaticSettings, quantize_onnx_static
from fedge.shared.errors import ExportError


def _conv_model(path: Path) -> None:
    """Conv(3->8, 3x3) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(8->4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "cw"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "cb"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "gw"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "gb"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _zero_point_types(path: Path) -> tuple[set[int], set[int]]:
    """Element types of QuantizeLinear zero points: (activations, weights)."""
    import onnx

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and n.input[0] in inits}  # fmt: skip
    activations = {inits[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[2] in inits}  # fmt: skip
    weight_types = {inits[w].data_type for w in weights if len(inits[w].dims) > 1}  # not biases
    return activations, weight_types


@pytest.mark.parametrize(("target", "act", "weight"), [
    ("x86-64", "u8", "s8"), ("x86-64-vnni", "u8", "s8"), ("arm64", "s8", "s8"),
])  # fmt: skip
def test_each_target_quantizes_with_its_types(tmp_path: Path, target: str, act: str,
                                              weight: str) -> None:  # fmt: skip
    from onnx import TensorProto

    fp32 = tmp_path / "fp32.onnx"
    _conv_model(fp32)
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    out = quantize_onnx_static(fp32, tmp_path / f"{target}.onnx", CalibrationReader(x),
                               method="minmax", target=target)  # fmt: skip
    types = {"u8": TensorProto.UINT8, "s8": TensorProto.INT8}
    activations, weights = _zero_point_types(out)
    assert activations == {types[act]} and weights == {types[weight]}
    assert STATIC_TARGETS[target].activations == act


def test_unknown_target_and_explicit_settings(tmp_path: Path) -> None:
    fp32 = tmp_path / "fp32.onnx"
    _conv_model(fp32)
    x = np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with pytest.raises(ExportError, match="unknown target 'riscv'"):
        quantize_onnx_static(fp32, tmp_path / "q.onnx", CalibrationReader(x), target="riscv")
    conv_only = StaticSettings("u8", "s8", op_types=("Conv",))
    out = quantize_onnx_static(fp32, tmp_path / "c.onnx", CalibrationReader(x), method="minmax",
                               target=conv_only)  # fmt: skip
    import onnx

    quantized_inputs = {n.output[0] for n in onnx.load(str(out)).graph.node
                        if n.op_type == "DequantizeLinear"}  # fmt: skip
    gemm = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Gemm")
    assert not set(gemm.input) & quantized_inputs  # Gemm left in fp32
