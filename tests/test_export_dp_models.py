"""A model made DP-compatible (BatchNorm -> GroupNorm, for DP-SGD) still exports and agrees."""

from pathlib import Path

import pytest
from export_support import make_key, make_run
from torch import nn

from fedge.edge.export.pipeline import export_bundle
from fedge.shared import bundle
from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint


@pytest.mark.slow
def test_groupnorm_mobilenet_exports_to_onnx_and_tflite(tmp_path: Path) -> None:
    private, public = make_key(tmp_path / "keys")
    run = make_run(
        tmp_path / "run",
        epochs=0,
        model="mobilenet_v3_small",
        image_size=32,
        privacy={"dp": "record"},
    )
    model = load_model_from_checkpoint(load_checkpoint(run / "model.safetensors"))
    modules = list(model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in modules)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    report = export_bundle(
        run,
        tmp_path / "bundle",
        formats=("onnx", "tflite"),
        quantize=("none",),
        signing_key=private,
        progress=False,
    )
    assert report.skipped == {} and report.failed == []
    manifest = bundle.verify_bundle(tmp_path / "bundle", public)
    assert sorted(a.file for a in manifest.artifacts) == [
        "artifacts/model-fp32.onnx",
        "artifacts/model-fp32.tflite",
    ]
    assert all(a.validation["passed"] for a in manifest.artifacts)
