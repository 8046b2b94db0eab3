"""Export, then validate: unvalidated bundles, ``revalidate_bundle``, failures collected once.

Validation runs the device runtime, so the self-test logits a bundle carries are
exactly what ``fedge.edge.device.runtime`` computes for each artifact.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edge_device_support import ArtifactPlan, Linear, make_bundle, rgb_task
from export_support import eval_inputs, make_key, make_run

from fedge.edge.device.runtime import EdgeModel, load_artifact
from fedge.edge.export.pipeline import export_bundle
from fedge.edge.export.validate import ValidationFailed, reference_logits, validate
from fedge.edge.export.validate_bundle import default_source, revalidate_bundle
from fedge.shared import bundle
from fedge.shared.errors import BundleError, ConfigError
from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint

NOISE = ("oneDNN", "XNNPACK", "KernelPreference", "absl", "WARNING: All log messages")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("runs") / "mlp", epochs=5, task="breast-cancer", model="mlp"
    )


def _unvalidated(run: Path, out: Path, key: Path, formats: tuple[str, ...]) -> Path:
    export_bundle(
        run, out, formats=formats, quantize=("none", "dynamic"), signing_key=key,
        progress=False, validate=False,
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_unvalidated_bundle_says_so_then_revalidation_records_device_logits(
    mlp_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    stale = tmp_path / "bundle.validation.json"
    stale.write_text("{}")  # a table of an older bundle must not sit beside a new one
    _unvalidated(mlp_run, out, keys[0], ("onnx", "tflite"))
    manifest = bundle.verify_bundle(out, keys[1])
    assert len(manifest.artifacts) == 4
    assert all(a["validation"] is None for a in manifest.raw["artifacts"])
    assert manifest.self_test is None and not any(a.passed for a in manifest.artifacts)
    card = json.loads((out / "model_card.json").read_text())
    assert card["validated"] is False and card["validation"] is None
    assert not stale.exists()
    with pytest.raises(BundleError, match="no validated artifact"):
        EdgeModel.open(out, keys[1])

    report = revalidate_bundle(out, source=mlp_run, signing_key=keys[0])
    assert report.failed == [] and {r["status"] for r in report.rows} == {"pass"}
    again = bundle.verify_bundle(out, keys[1])
    assert again.bundle_id == manifest.bundle_id == report.bundle_id  # same artifact bytes
    assert all(a.passed for a in again.artifacts)
    card = json.loads((out / "model_card.json").read_text())
    assert card["validated"] is True
    assert card["validation_data"]["eval_data"] == "breast-cancer:test"
    assert json.loads(stale.read_text())["rows"] == card["validation"]
    # The self-test expectations are what the device runtime computes, bit for bit.
    probe = bundle.self_test_inputs(again)
    record = again.self_test or {}
    for entry in again.artifacts:
        expected = bundle.decode_array(record["expected"][entry.file], record["expected_shape"])
        with load_artifact(out, again, entry) as model:
            assert np.array_equal(model.predict_tensor(probe), expected), entry.file
        with EdgeModel.open(out, keys[1], artifact=entry.file) as model:
            assert model.self_test().passed


@pytest.mark.slow
def test_validate_runs_every_artifact_then_raises_once(
    mlp_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = _unvalidated(mlp_run, tmp_path / "bundle", keys[0], ("onnx",))
    ckpt = load_checkpoint(mlp_run / "model.safetensors")
    _, x, y = eval_inputs("breast-cancer", ckpt.task)
    reference = reference_logits(load_model_from_checkpoint(ckpt), x)
    with pytest.raises(ValidationFailed) as info:
        validate(out, keys[1], x, y, reference, max_accuracy_drop=-1.0)
    results = info.value.results
    assert [r.artifact for r in results] == ["model-fp32.onnx", "model-int8-dynamic.onnx"]
    assert not any(r.passed for r in results)
    assert "2 of 2" in str(info.value) and "model-int8-dynamic.onnx (accuracy drop" in str(
        info.value
    )
    # The measurements are real: fp32 matches PyTorch, and both keep PyTorch's accuracy.
    assert results[0].max_abs_diff is not None and results[0].max_abs_diff < 1e-4
    assert results[0].accuracy == results[0].reference_accuracy > 0.9
    assert validate(out, keys[1], x, y, reference, max_accuracy_drop=1.0)[1].passed


@pytest.mark.slow
def test_revalidation_refuses_another_model(
    mlp_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    out = _unvalidated(mlp_run, tmp_path / "bundle", keys[0], ("onnx",))
    other = make_run(tmp_path / "other", epochs=0)  # digits, not breast-cancer
    with pytest.raises(ConfigError, match="not the one the bundle was exported from"):
        revalidate_bundle(out, source=other, signing_key=keys[0])
    assert not bundle.verify_bundle(out, keys[1]).artifacts[0].passed


def test_validation_runs_nhwc_and_fixed_batch_artifacts_as_a_device_does(
    keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """NCHW evaluation inputs through NHWC TFLite artifacts, batch 1 and dynamic, and ONNX."""
    from fedge.edge.export.bundle_writer import record_validation
    from fedge.shared.signing import load_private_key

    task = rgb_task()
    plans = (
        ArtifactPlan("model-fp32.onnx"),
        ArtifactPlan("model-nhwc-b1.tflite", "tflite", layout="NHWC", batch=1),
        ArtifactPlan("model-nhwc.tflite", "tflite", layout="NHWC"),
    )
    out = make_bundle(tmp_path / "bundle", keys[0], task=task, plans=plans)
    x = np.random.default_rng(5).standard_normal((37, *task.input_shape)).astype(np.float32)
    reference = Linear.for_task(task)(x)
    labels = reference.argmax(1)
    results = validate(out, keys[1], x, labels, reference, max_accuracy_drop=0.0)
    assert [r.artifact for r in results] == [p.name for p in plans]
    for result in results:
        assert result.passed and result.top1_agreement == 1.0, result
        assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    manifest = record_validation(
        out, results, self_test_inputs=x[:3], self_test_labels=[int(v) for v in labels[:3]],
        card_updates={"validated": True}, private_key=load_private_key(keys[0]),
    )  # fmt: skip
    for entry in manifest.artifacts:
        with EdgeModel.open(out, keys[1], artifact=entry.file) as model:
            result = model.self_test()
            assert result.passed and result.max_abs_diff == 0.0 and result.examples == 3


def test_default_source_is_where_export_puts_bundles(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert default_source(run / "bundle") == run
    checkpoint = tmp_path / "round-0003.safetensors"
    checkpoint.write_bytes(b"")
    assert default_source(tmp_path / "round-0003-bundle") == checkpoint
    with pytest.raises(ConfigError, match="cannot tell which model"):
        default_source(tmp_path / "elsewhere" / "bundle")


@pytest.mark.slow
def test_fedge_export_prints_only_fedge_output(
    mlp_run: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """Converter/runtime chatter goes to export.log beside the bundle, never to the terminal."""
    out = tmp_path / "quiet" / "bundle"
    env = {**os.environ, "FEDGE_HOME": str(tmp_path / "home"), "COLUMNS": "100"}
    done = subprocess.run(
        [sys.executable, "-m", "fedge", "export", str(mlp_run), "--out", str(out),
         "--key", str(keys[0]), "--formats", "onnx,tflite", "--quantize", "none"],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert [marker for marker in NOISE if marker in shown] == []
    assert "model-fp32.tflite" in shown and "%" in shown and "✓ pass" in shown
    log = tmp_path / "quiet" / "export.log"
    assert str(log) in shown.replace("\n", "")
    logged = log.read_text()
    assert [marker for marker in NOISE if marker in logged], logged[-2000:]
