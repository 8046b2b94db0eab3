"""Federated static-int8 calibration, in process: three "sites" of digits, summed histograms.

Covers ``fedge.shared.activation_histograms`` (sites) and
``fedge.edge.export.federated_quantize`` (server) on fedge's trained digits CNN:
the sum is exact, federal ranges quantize as well as central calibration (ONNX and
TFLite), specs from the network are bounded, and one record moves the pass-1
ranges by at most one coarse bin.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedge.edge.export.calibration import CalibrationReader
from fedge.edge.export.federated_quantize import (
    onnx_coarse_spec,
    quantize_onnx_static_from_ranges,
    ranges_from_histograms,
)
from fedge.edge.export.quantize import quantize_onnx_static
from fedge.shared.activation_histograms import (
    COARSE_PER_OCTAVE,
    BinSpec,
    TensorBins,
    gaussian_noise,
    l2_sensitivity,
    refine_spec,
    site_histograms,
)
from fedge.shared.errors import ConfigError, DataError, ExportError, ModelError

SITES = 3
AGREEMENT_SLACK = 0.005  # the "within 0.5 points of top-1 agreement"


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def _onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _tflite_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Through the device runtime's LiteRT backend (it scales int8 I/O)."""
    from fedge.edge.device.runtime import _TFLiteBackend

    return _TFLiteBackend(path, None).run(x)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """fedge's digits CNN trained briefly, exported to ONNX; site splits and the test split."""
    from fedge.edge.export.onnx_export import export_onnx
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.models import build_run_model
    from fedge.shared.ml.training import make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(0)
    cfg = RunConfig.from_mapping({"num_rounds": 2})
    task = task_for_run(cfg)
    model = build_run_model(cfg, task, load_weights=False)
    data = load_data(task.name, task)
    x = prepare(data.x, task.preprocessing)
    train(model, make_loader(x, data.y, 32, True, 0), 3, 0.05, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("fedcal")
    fp32 = export_onnx(model.eval(), torch.from_numpy(x[:1]), folder / "fp32.onnx")
    test = load_data(f"{task.name}:test", task)
    order = np.random.default_rng(1).permutation(len(x))
    return {
        "model": model, "folder": folder, "fp32": fp32, "union": x[order],
        "sites": np.array_split(x[order], SITES), "test": prepare(test.x, task.preprocessing),
        "test_y": test.y,
    }  # fmt: skip


@pytest.fixture(scope="module")
def bundle(digits: dict[str, Any]) -> dict[str, Any]:
    """A bundle whose static int8 ONNX and TFLite come from federated ranges.

    ``pipeline.export`` gets ``federated_static_quantizer`` for both formats, with an
    in-process "round" that sums the three sites' histograms (Flower's job elsewhere).
    """
    from fedge.edge.export.federated_quantize import federated_static_quantizer
    from fedge.edge.export.pipeline import export
    from fedge.shared import signing
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.data import task_for_run

    calls: list[tuple[str, str]] = []

    def sum_at_sites(model: bytes, fmt: str, spec: BinSpec) -> np.ndarray:
        calls.append((fmt, spec.kind))
        return np.sum([site_histograms(model, fmt, x, spec) for x in digits["sites"]], axis=0)

    folder = digits["folder"]
    signing.generate_signing_key(folder / "signing.key")
    exported = export(
        digits["model"], task_for_run(RunConfig.from_mapping({"num_rounds": 2})),
        folder / "bundle", private_key=signing.load_private_key(folder / "signing.key"),
        version="fedcal", sample=torch.from_numpy(digits["test"][:1]), calibration=None,
        formats=("onnx", "tflite"), quantize=("none", "static"),
        static_quantizer=federated_static_quantizer("onnx", sum_at_sites),
        static_tflite_quantizer=federated_static_quantizer("tflite", sum_at_sites),
    )  # fmt: skip
    return {"exported": exported, "calls": calls, "dir": folder / "bundle" / "artifacts"}


def test_pipeline_builds_static_int8_from_federated_ranges(bundle: dict[str, Any]) -> None:
    expected = [("onnx", "coarse"), ("onnx", "fine"), ("tflite", "coarse"), ("tflite", "fine")]
    assert sorted(bundle["calls"]) == expected
    exported = bundle["exported"]
    assert not exported.skipped
    assert {"model-int8-static.onnx", "model-int8-static.tflite"} <= set(exported.sizes)


def test_federated_onnx_agrees_like_central(digits: dict[str, Any], bundle: dict[str, Any]) -> None:
    fp32, federated = bundle["dir"] / "model-fp32.onnx", bundle["dir"] / "model-int8-static.onnx"
    reader = CalibrationReader(digits["union"])
    central = quantize_onnx_static(fp32, digits["folder"] / "central.onnx", reader)
    test = digits["test"]
    reference = _onnx_logits(fp32, test)
    fed_agree = _agreement(_onnx_logits(federated, test), reference)
    central_agree = _agreement(_onnx_logits(central, test), reference)
    assert fed_agree >= central_agree - AGREEMENT_SLACK, (fed_agree, central_agree)
    assert fed_agree > 0.95
    # The ranges really are in the artifact: QuantizeLinear nodes for the activations.
    import onnx

    ops = [n.op_type for n in onnx.load(str(federated)).graph.node]
    assert ops.count("QuantizeLinear") >= 5


@pytest.mark.filterwarnings("ignore:Warning. Enabling .experimental_preserve_all_tensors")
def test_federated_tflite_agrees_like_central(
    digits: dict[str, Any], bundle: dict[str, Any]
) -> None:
    from ai_edge_quantizer import quantizer, recipe

    from fedge.shared.activation_histograms import tflite_signature

    fp32 = bundle["dir"] / "model-fp32.tflite"
    federated = bundle["dir"] / "model-int8-static.tflite"
    model = fp32.read_bytes()
    # Central: ai-edge-quantizer's own calibration on the union of the sites' data.
    engine = quantizer.Quantizer(model)
    engine.load_quantization_recipe(recipe.static_wi8_ai8())
    signature, name = tflite_signature(model)
    result = engine.calibrate({signature: [{name: row[None]} for row in digits["union"]]})
    central = digits["folder"] / "central.tflite"
    quantized = engine.quantize(calibration_result=result, enable_progress_report=False)
    central.write_bytes(bytes(quantized.quantized_model))
    test = digits["test"]
    reference = _tflite_logits(fp32, test)
    fed_agree = _agreement(_tflite_logits(federated, test), reference)
    central_agree = _agreement(_tflite_logits(central, test), reference)
    assert fed_agree >= central_agree - AGREEMENT_SLACK, (fed_agree, central_agree)
    assert fed_agree > 0.95


def test_one_record_moves_coarse_ranges_by_at_most_one_bin(digits: dict[str, Any]) -> None:
    model, spec = onnx_coarse_spec(digits["fp32"])
    union = digits["union"]
    base = refine_spec(spec, site_histograms(model, "onnx", union, spec))
    for changed_record in (union[0] * 1000.0, np.zeros_like(union[0]), -union[0] * 50.0):
        changed = union.copy()
        changed[0] = changed_record
        moved = refine_spec(spec, site_histograms(model, "onnx", changed, spec))
        for before, after in zip(base.tensors, moved.tensors, strict=True):
            bins_moved = abs(math.log2(after.hi / before.hi)) * COARSE_PER_OCTAVE
            assert bins_moved <= 1 + 1e-9, (before.name, before.hi, after.hi)


def test_missing_ranges_and_tensors_fail_closed(digits: dict[str, Any]) -> None:
    model, spec = onnx_coarse_spec(digits["fp32"])
    ranges = {name: (-1.0, 1.0) for name in spec.names}
    ranges.pop("logits")
    with pytest.raises(ExportError, match="no range for 1 tensor"):
        quantize_onnx_static_from_ranges(digits["fp32"], digits["folder"] / "x.onnx", ranges)
    stranger = BinSpec("coarse", (TensorBins("not_a_tensor", -24, 24, 193, 4),))
    with pytest.raises(ModelError, match="no tensor 'not_a_tensor'"):
        site_histograms(model, "onnx", digits["sites"][0][:4], stranger)
    wrong_size = BinSpec("coarse", (TensorBins("logits", -24, 24, 193, 11),))
    with pytest.raises(ModelError, match="11 per record"):
        site_histograms(model, "onnx", digits["sites"][0][:4], wrong_size)
    with pytest.raises(DataError, match="fine"):
        ranges_from_histograms(spec, np.zeros(spec.total_bins, dtype=np.int64))


def test_gaussian_noise_scales_with_sensitivity() -> None:
    coarse = BinSpec("coarse", tuple(TensorBins(f"t{i}", -24, 24, 193, 100) for i in range(4)))
    fine = BinSpec("fine", tuple(TensorBins(f"t{i}", -1, 1, 64, 100) for i in range(4)))
    assert l2_sensitivity(coarse) == 2.0 and l2_sensitivity(fine) == 200.0
    counts = np.full(fine.total_bins, 1000, dtype=np.int64)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(gaussian_noise(counts, fine, 0.0, rng), counts)
    noisy = gaussian_noise(counts, fine, 1.0, rng)
    assert noisy.dtype == np.int64 and noisy.min() >= 0
    assert 150 < float(np.std(noisy - counts)) < 250  # sigma = 1.0 * 200, clipped at 0
    with pytest.raises(DataError):
        gaussian_noise(counts[:-1], fine, 1.0, rng)


GOOD = {"kind": "fine", "tensors": [["conv/out_0", -2.0, 2.0, 2048, 64]]}


def _spec_text(**changes: Any) -> str:
    return json.dumps({**GOOD, **changes})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not JSON"),
        (json.dumps([1, 2]), "exactly 'kind' and 'tensors'"),
        (json.dumps({**GOOD, "extra": 1}), "exactly 'kind' and 'tensors'"),
        (_spec_text(kind="medium"), "unknown bin spec kind"),
        (_spec_text(tensors=[]), "1 to 4096 tensors"),
        (_spec_text(tensors=[["t", -1, 1, 8, 1]] * 4097), "at most 4096"),
        (_spec_text(tensors=[["a\nb", -1, 1, 8, 1]]), "bad tensor name"),
        (_spec_text(tensors=[["x" * 8193, -1, 1, 8, 1]]), "too long"),
        (_spec_text(tensors=[["t\u00e9", -1, 1, 8, 1]]), "bad tensor name"),
        (_spec_text(tensors=[["t", 1, 1, 8, 1]]), "lo < hi"),
        (_spec_text(tensors=[["t", 2, 1, 8, 1]]), "lo < hi"),
        ('{"kind":"fine","tensors":[["t",NaN,1,8,1]]}', "finite"),
        ('{"kind":"fine","tensors":[["t",-1,Infinity,8,1]]}', "finite"),
        (_spec_text(tensors=[["t", -1e31, 1, 8, 1]]), "beyond"),
        (_spec_text(tensors=[["t", -1, 1, 1, 1]]), "allowed 2..16384"),
        (_spec_text(tensors=[["t", -1, 1, 16385, 1]]), "allowed 2..16384"),
        (_spec_text(tensors=[["t", -1, 1, 8.0, 1]]), "not integers"),
        (_spec_text(tensors=[["t", -1, 1, True, 1]]), "not integers"),
        (_spec_text(tensors=[["t", "-1", 1, 8, 1]]), "not numeric"),
        (_spec_text(tensors=[["t", -1, 1, 8, 0]]), "elements per record"),
        (_spec_text(tensors=[["t", -1, 1, 8]]), "name, lo, hi, bins, elements"),
        (_spec_text(tensors=[[5, -1, 1, 8, 1]]), "not a string"),
        (_spec_text(tensors=[["t", -1, 1, 8, 1], ["t", -1, 1, 8, 1]]), "twice"),
        (_spec_text(tensors=[[f"t{i}", -1, 1, 16384, 1] for i in range(257)]), "in all"),
        (_spec_text(kind="coarse", tensors=[["t", -1, 1, 8, 1]]), "fixed log2 bins"),
        (" " * (4 << 20) + "{}", "limit"),
        # A crafted coordinator's spec: these escaped as RecursionError / OverflowError.
        ("[" * 100_000 + "]" * 100_000, "not JSON"),
        ('{"kind":"fine","tensors":[["t",-1,' + "9" * 400 + ",8,1]]}", "beyond"),
    ],
)
def test_bin_spec_from_json_rejects_malformed(text: str, why: str) -> None:
    with pytest.raises(DataError, match=why):
        BinSpec.from_json(text)


def test_bin_spec_round_trips() -> None:
    spec = BinSpec.from_json(_spec_text())
    assert spec.total_bins == 2048 and spec.names == ("conv/out_0",)
    assert BinSpec.from_json(spec.to_json()) == spec


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "flwr", "sklearn", "ai_edge_quantizer", "onnx"):
                raise ImportError(f"{name} is blocked at a site")
            return None

    sys.meta_path.insert(0, Blocker())
    import numpy as np
    from fedge.shared.activation_histograms import BinSpec, site_histograms

    model, spec, x = open(sys.argv[1], "rb").read(), open(sys.argv[2]).read(), sys.argv[3]
    counts = site_histograms(model, "onnx", np.load(x), BinSpec.from_json(spec))
    print(int(counts.sum()))
    """
)


def test_site_side_runs_without_torch_flwr_or_onnx(digits: dict[str, Any], tmp_path: Path) -> None:
    model, spec = onnx_coarse_spec(digits["fp32"])
    x = digits["sites"][1][:10]
    (tmp_path / "m.onnx").write_bytes(model)
    (tmp_path / "spec.json").write_text(spec.to_json(), encoding="utf-8")
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(tmp_path / "m.onnx"), str(tmp_path / "spec.json"),
         str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == int(site_histograms(model, "onnx", x, spec).sum())


def test_static_tflite_is_planned_only_with_federated_ranges() -> None:
    from fedge.edge.export.pipeline import plan_artifacts

    with pytest.raises(ConfigError, match="dynamic-range only unless federated"):
        plan_artifacts(("tflite",), ("static",))
    plans, skipped = plan_artifacts(("tflite",), ("static",), static_tflite=True)
    assert [(p.name, p.bundled) for p in plans] == [
        ("model-fp32.tflite", False), ("model-int8-static.tflite", True),
    ]  # fmt: skip
    assert not skipped
    plans, _ = plan_artifacts(("onnx", "tflite"), ("dynamic", "static"), static_tflite=True)
    assert {"model-int8.tflite", "model-int8-static.tflite", "model-int8-static.onnx"} <= {
        p.name for p in plans
    }


def test_range_methods_against_the_true_activations(digits: dict[str, Any]) -> None:
    import onnxruntime as ort

    model, spec = onnx_coarse_spec(digits["fp32"])
    union = digits["union"]
    fine = refine_spec(spec, site_histograms(model, "onnx", union, spec), quantile=1.0)
    summed = site_histograms(model, "onnx", union, fine)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    values = dict(zip(fine.names, session.run(list(fine.names), {"input": union}), strict=True))
    minmax = ranges_from_histograms(fine, summed, "minmax")
    for method in ("percentile", "entropy"):
        ranges = ranges_from_histograms(fine, summed, method)
        for t in fine.tensors:
            width = (t.hi - t.lo) / t.bins
            lo, hi = ranges[t.name]
            assert minmax[t.name][0] - width <= lo <= hi <= minmax[t.name][1] + width
    for t in fine.tensors:  # quantile 1.0: nothing clamped, so min/max within one fine bin
        width = (t.hi - t.lo) / t.bins
        true_lo, true_hi = min(values[t.name].min(), 0.0), max(values[t.name].max(), 0.0)
        assert abs(minmax[t.name][0] - true_lo) <= width
        assert abs(minmax[t.name][1] - true_hi) <= width


def test_noise_floor_keeps_dp_pass_one_close_to_exact(digits: dict[str, Any]) -> None:
    from fedge.shared.activation_histograms import noise_sigma

    model, spec = onnx_coarse_spec(digits["fp32"])
    exact = site_histograms(model, "onnx", digits["union"], spec)
    noisy = gaussian_noise(exact, spec, 1.0, np.random.default_rng(3))
    floor = 3 * noise_sigma(spec, 1.0)
    base, dp = refine_spec(spec, exact), refine_spec(spec, noisy, noise_floor=floor)
    for before, after in zip(base.tensors, dp.tensors, strict=True):
        assert abs(math.log2(after.hi / before.hi)) * COARSE_PER_OCTAVE <= 1 + 1e-9
    # A tensor whose noisy pass-2 counts all sit under the floor keeps the pass-1 bound.
    fine = BinSpec("fine", (TensorBins("t", -2.0, 2.0, 2048, 8),))
    counts = np.zeros(2048, dtype=np.int64)
    counts[1000] = 5
    assert ranges_from_histograms(fine, counts, noise_floor=10.0) == {"t": (-2.0, 2.0)}
    with pytest.raises(DataError, match="no pass-2 counts"):
        ranges_from_histograms(fine, np.zeros(2048, dtype=np.int64))
