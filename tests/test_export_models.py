"""Every built-in model family exports to every format; unsupported layers skip one format."""

from pathlib import Path

import numpy as np
import pytest
import torch
from export_support import bundle_logits, eval_inputs, make_key, make_run, run_onnx_file
from torch import nn

from fedge.edge.export.calibration import PreparedData
from fedge.edge.export.onnx_export import export_onnx
from fedge.edge.export.pipeline import export_bundle, export_model
from fedge.edge.export.validate import reference_logits
from fedge.shared import bundle, signing
from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint
from fedge.shared.tasks import TabularPreprocessing, TaskSpec

ALL = [
    "artifacts/model-fp32.onnx", "artifacts/model-int8-dynamic.onnx",
    "artifacts/model-int8-static.onnx", "artifacts/model-fp32.tflite",
    "artifacts/model-int8.tflite",
]  # fmt: skip


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys"))


def check_against_torch(
    bundle_dir: Path, run_dir: Path, task_name: str, int8_agreement: float | None = 0.97
) -> None:
    """Every artifact agrees with PyTorch: logits within its tolerance on the self-test
    inputs; on the whole test split, fp32 to float rounding and int8 on top-1.

    (Static int8 logits can be far off on inputs outside the calibration range,
    e.g. breast-cancer rows beyond the 85-row public split, while the class is
    still right; see README.md, "Formats and quantization".)
    """
    ckpt = load_checkpoint(run_dir / "model.safetensors")
    model = load_model_from_checkpoint(ckpt)
    _, x, _ = eval_inputs(task_name, ckpt.task)
    reference = reference_logits(model, x)
    manifest = bundle.read_manifest(bundle_dir)
    probe = bundle.self_test_inputs(manifest)
    probe_reference = reference_logits(model, probe)
    on_probe = bundle_logits(bundle_dir, probe)
    for entry, got in bundle_logits(bundle_dir, x).values():
        probe_diff = float(np.max(np.abs(on_probe[entry.file][1] - probe_reference)))
        assert probe_diff <= entry.atol, (entry.file, probe_diff, entry.atol)
        assert got.shape == reference.shape
        if entry.precision == "fp32":
            assert float(np.max(np.abs(got - reference))) <= entry.atol, entry.file
        elif int8_agreement is not None:
            agreement = np.mean(got.argmax(1) == reference.argmax(1))
            assert agreement >= int8_agreement, entry.file


@pytest.mark.slow
def test_mlp_on_breast_cancer_exports_to_every_format(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from fedge.edge.device.runtime import EdgeModel

    run = make_run(tmp_path / "mlp", epochs=5, task="breast-cancer", model="mlp")
    report = export_bundle(run, tmp_path / "bundle", signing_key=keys[0], progress=False)
    assert report.skipped == {} and report.failed == []
    manifest = bundle.verify_bundle(tmp_path / "bundle", keys[1])
    assert [a.file for a in manifest.artifacts] == ALL
    assert manifest.inputs[0].shape == (-1, 30) and manifest.inputs[0].layout == "NF"
    check_against_torch(tmp_path / "bundle", run, "breast-cancer")
    ckpt = load_checkpoint(run / "model.safetensors")
    raw, x, _ = eval_inputs("breast-cancer", ckpt.task)
    expected = reference_logits(load_model_from_checkpoint(ckpt), x).argmax(1)
    with EdgeModel.open(tmp_path / "bundle", keys[1], format="tflite", precision="fp32") as edge:
        assert np.array_equal(edge.predict_raw(raw).indices, expected)


@pytest.mark.slow
def test_mobilenet_v3_small_exports_to_every_format(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Random init, 32x32x3 digits: the export path of a real torchvision backbone.

    An untrained network's logits are nearly tied, so int8 rounding reorders
    them at random: accuracy is not judged here (``max_accuracy_drop=100``);
    closeness to PyTorch is, for every artifact.
    """
    run = make_run(tmp_path / "mnv3", epochs=0, model="mobilenet_v3_small", image_size=32)
    report = export_bundle(
        run, tmp_path / "bundle", signing_key=keys[0], progress=False, max_accuracy_drop=100.0
    )
    assert report.skipped == {} and report.failed == []
    manifest = bundle.verify_bundle(tmp_path / "bundle", keys[1])
    assert [a.file for a in manifest.artifacts] == ALL
    assert manifest.inputs[0].shape == (-1, 3, 32, 32)
    check_against_torch(tmp_path / "bundle", run, "digits", int8_agreement=None)


class DetLayer(nn.Module):
    """Scales each row by the determinant of its 2x2 view: ONNX has Det, LiteRT does not."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        det = torch.linalg.det(x.reshape(-1, 2, 2)).reshape(-1, 1)
        return self.classifier(x * det)


def tabular(columns: int = 4) -> TaskSpec:
    names = tuple(f"f{i}" for i in range(columns))
    pre = TabularPreprocessing(names, (0.0,) * columns, (1.0,) * columns)
    return TaskSpec("tabular", ("no", "yes"), pre)


@pytest.mark.slow
def test_unsupported_layer_skips_that_format_with_its_reason(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = DetLayer().eval()
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    y = reference_logits(model, x).argmax(1)
    report = export_model(
        model, tabular(), tmp_path / "bundle",
        eval_set=PreparedData(x, y, "generated"), calibration=PreparedData(x, y, "generated"),
        private_key=signing.load_private_key(keys[0]), version="det-1",
        quantize=("none", "dynamic"), progress=False,
        max_accuracy_drop=100.0,  # random weights: int8 may reorder near-tied logits
    )  # fmt: skip
    assert set(report.skipped) == {"model-fp32.tflite", "model-int8.tflite"}
    assert "linalg_det" in report.skipped["model-fp32.tflite"]
    assert report.skipped["model-int8.tflite"].startswith("needs model-fp32.tflite")
    manifest = bundle.verify_bundle(tmp_path / "bundle", keys[1])
    assert [a.file for a in manifest.artifacts] == ALL[:2]
    statuses = {row["artifact"]: row["status"] for row in report.rows}
    assert statuses["model-fp32.tflite"] == "skipped" and statuses["model-fp32.onnx"] == "pass"


class SpectrumLayer(nn.Module):
    """An rfft front end: the TorchScript ONNX exporter lacks it, torch.export has it."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.fft.rfft(x, n=6).abs())


@pytest.mark.slow
def test_onnx_export_falls_back_to_the_dynamo_exporter(tmp_path: Path) -> None:
    model = SpectrumLayer().eval()
    x = torch.randn(5, 4)
    path = export_onnx(model, x[:1], tmp_path / "spectrum.onnx")
    assert not (tmp_path / "spectrum.onnx.data").exists()
    got = run_onnx_file(path, x.numpy())  # batch of 5 through a model traced with 1
    assert np.allclose(got, model(x).detach().numpy(), atol=1e-5)
