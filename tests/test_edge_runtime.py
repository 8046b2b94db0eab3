"""The torch-free edge runtime: artifact selection, inputs, predictions, errors, bench, CLI."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from edge_device_support import (
    ArtifactPlan,
    Linear,
    digits_task,
    make_bundle,
    make_keys,
    rgb_task,
    tabular_task,
)
from PIL import Image
from typer.testing import CliRunner

from fedge.cli.edge import app
from fedge.edge.device.bench import bench_bundle, render_bench_table
from fedge.edge.device.inputs import load_inputs
from fedge.edge.device.runtime import EdgeModel, select_artifact
from fedge.shared.bundle import read_manifest
from fedge.shared.errors import BundleError, ConfigError, DataError, ModelError
from fedge.shared.preprocess import prepare

# Sizes grow from top to bottom, so the expected default is known without measuring.
MIXED = (
    ArtifactPlan("model-int8-static.onnx", precision="int8", passed=False),
    ArtifactPlan("model-int8-dynamic.onnx", precision="int8", extra_fp32=40),
    ArtifactPlan("model-fp32.tflite", "tflite", batch=1),
    ArtifactPlan("model-fp32.onnx", extra_fp32=4000),
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    return make_bundle(tmp_path_factory.mktemp("mixed") / "bundle", keys[0], plans=MIXED)


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    plans = (ArtifactPlan("model-fp32.onnx"), ArtifactPlan("model-fp32.tflite", "tflite"))
    root = tmp_path_factory.mktemp("tabular") / "bundle"
    return make_bundle(root, keys[0], task=tabular_task(), plans=plans)


def digit_images(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(n)]


# ------------------------------------------------------------------ artifact selection


def test_default_is_the_smallest_validated_artifact_with_a_runtime(mixed: Path) -> None:
    manifest = read_manifest(mixed)
    sizes = [a.size for a in manifest.artifacts]
    assert sizes == sorted(sizes), "the plans must list artifacts from small to large"
    # The smallest, model-int8-static.onnx, failed validation: never chosen.
    pick = select_artifact(manifest)
    assert pick.file == "artifacts/model-int8-dynamic.onnx"
    assert select_artifact(manifest, format="tflite").file == "artifacts/model-fp32.tflite"
    assert select_artifact(manifest, precision="fp32").file == "artifacts/model-fp32.tflite"
    only_onnx = select_artifact(manifest, precision="fp32", available=["onnx"])
    assert only_onnx.file == "artifacts/model-fp32.onnx"
    assert select_artifact(manifest, available=["tflite"]).file == "artifacts/model-fp32.tflite"


def test_selection_errors_are_clear(mixed: Path) -> None:
    manifest = read_manifest(mixed)
    with pytest.raises(BundleError, match="no validated artifact with format=tflite, precision"):
        select_artifact(manifest, format="tflite", precision="int8")
    with pytest.raises(BundleError, match=r"model-int8-static\.onnx \(failed validation\)"):
        select_artifact(manifest, artifact="model-int8-static.onnx")
    with pytest.raises(ConfigError, match="no runtime for tflite"):
        select_artifact(manifest, format="tflite", available=["onnx"])
    with pytest.raises(ConfigError, match="not one of"):
        select_artifact(manifest, format="coreml")
    with pytest.raises(ConfigError, match="not one of"):
        select_artifact(manifest, precision="fp16")


def test_open_loads_the_selected_artifact(mixed: Path, keys: tuple[Path, Path]) -> None:
    with EdgeModel.open(mixed, keys[1]) as model:
        assert model.artifact.file == "artifacts/model-int8-dynamic.onnx"
        assert model.labels == digits_task().classes
        assert model.describe()["format"] == "onnx"
    with EdgeModel.open(mixed, keys[1], format="tflite", precision="fp32") as model:
        assert model.artifact.format == "tflite"
    with pytest.raises(ModelError, match="closed"):
        model.predict_tensor(np.zeros((1, 1, 8, 8), np.float32))


def test_open_refuses_a_tampered_bundle(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    root = make_bundle(tmp_path / "b", keys[0])
    path = root / "artifacts" / "model-fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model-fp32\.onnx does not match its sha256"):
        EdgeModel.open(root, keys[1])


# ------------------------------------------------------------------ predictions


@pytest.mark.parametrize("file", [p.name for p in MIXED if p.passed])
def test_every_artifact_predicts_like_the_reference(
    mixed: Path, keys: tuple[Path, Path], file: str
) -> None:
    reference = Linear.for_task(digits_task())
    images = digit_images(5)
    x = prepare(images, digits_task().preprocessing)
    with EdgeModel.open(mixed, keys[1], artifact=file) as model:
        result = model.predict_raw(images)
        np.testing.assert_allclose(result.logits, reference(x), atol=1e-4)
        assert result.labels == [str(i) for i in reference(x).argmax(axis=1)]
        assert np.all((result.scores > 0) & (result.scores <= 1))
        np.testing.assert_allclose(result.probabilities().sum(axis=1), 1.0, rtol=1e-5)
        test = model.self_test()
        assert test.passed and test.label_agreement == 1.0 and test.examples == 4


@pytest.mark.parametrize(
    "plan",
    [
        ArtifactPlan("nhwc-b1.tflite", "tflite", layout="NHWC", batch=1),
        ArtifactPlan("nhwc.tflite", "tflite", layout="NHWC"),
        ArtifactPlan("nchw.onnx"),
    ],
    ids=lambda p: p.name,
)
def test_nhwc_and_fixed_batch_artifacts_take_nchw_batches(
    tmp_path: Path, keys: tuple[Path, Path], plan: ArtifactPlan
) -> None:
    root = make_bundle(tmp_path / "rgb", keys[0], task=rgb_task(), plans=(plan,))
    x = np.random.default_rng(1).standard_normal((7, 3, 4, 4)).astype(np.float32)
    with EdgeModel.open(root, keys[1]) as model:
        np.testing.assert_allclose(
            model.predict_tensor(x), Linear.for_task(rgb_task())(x), atol=1e-4
        )
        np.testing.assert_allclose(
            model.predict_tensor(x[:2]), model.predict_tensor(x)[:2], atol=1e-5
        )
        assert model.self_test().passed


def test_a_failing_self_test_is_reported(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    root = make_bundle(tmp_path / "b", keys[0], corrupt_expectation="artifacts/model-fp32.onnx")
    with EdgeModel.open(root, keys[1]) as model:
        result = model.self_test()
    assert not result.passed and result.max_abs_diff == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((1, 3, 8, 8), np.float32), r"input has shape \(1, 3, 8, 8\) float32 but the "
         r"model expects \(N, 1, 8, 8\) float32"),
        (np.zeros((2, 1, 8, 8), np.float64), r"\(2, 1, 8, 8\) float64 but the model expects"),
        (np.zeros((1, 8, 8), np.float32), r"\(1, 8, 8\) float32"),
        (np.zeros((0, 1, 8, 8), np.float32), r"\(0, 1, 8, 8\)"),
    ],
)  # fmt: skip
def test_wrong_shape_or_dtype_names_expected_and_given(
    mixed: Path, keys: tuple[Path, Path], x: np.ndarray, message: str
) -> None:
    with EdgeModel.open(mixed, keys[1]) as model, pytest.raises(DataError, match=message):
        model.predict_tensor(x)
    with EdgeModel.open(mixed, keys[1], format="tflite") as model, pytest.raises(DataError):
        model.predict_tensor(x)


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_concurrent_predictions_are_consistent(
    mixed: Path, keys: tuple[Path, Path], fmt: str
) -> None:
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (1, 3, 5, 2)]
    with EdgeModel.open(mixed, keys[1], format=fmt, precision="fp32") as model:
        expected = [model.predict_tensor(b) for b in batches]
        failures: list[str] = []

        def worker(index: int) -> None:
            for _ in range(20):
                got = model.predict_tensor(batches[index])
                if got.shape != expected[index].shape or not np.allclose(got, expected[index]):
                    failures.append(f"batch {index}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


# ------------------------------------------------------------------ input files


def test_images_and_npy_inputs(tmp_path: Path, mixed: Path, keys: tuple[Path, Path]) -> None:
    images = digit_images(3)
    for i, image in enumerate(images[:2]):
        Image.fromarray(image).save(tmp_path / f"d{i}.png")
    Image.fromarray(np.stack([images[2]] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=100)
    np.save(tmp_path / "raw.npy", np.stack(images[:2]))
    task = digits_task()
    prepared = prepare(images, task.preprocessing)
    np.save(tmp_path / "pre.npy", prepared)
    batch = load_inputs(
        [tmp_path / "d0.png", tmp_path / "d1.png", tmp_path / "raw.npy", tmp_path / "pre.npy"],
        task,
    )
    assert batch.names == ["d0.png", "d1.png", "raw.npy[0]", "raw.npy[1]", "pre.npy[0]",
                           "pre.npy[1]", "pre.npy[2]"]  # fmt: skip
    np.testing.assert_allclose(batch.x[:2], prepared[:2], atol=1e-6)
    np.testing.assert_allclose(batch.x[2:4], prepared[:2], atol=1e-6)
    np.testing.assert_allclose(batch.x[4:], prepared, atol=1e-6)
    jpg = load_inputs([tmp_path / "rgb.jpg"], task)  # RGB converted to the task's grayscale
    assert jpg.x.shape == (1, 1, 8, 8)
    folder = load_inputs([tmp_path], task)
    assert len(folder.names) == 2 + 3 + 2 + 1  # d0, d1, pre.npy, raw.npy, rgb.jpg (sorted)
    assert folder.names[-1] == "rgb.jpg"
    with EdgeModel.open(mixed, keys[1]) as model:
        assert len(model.predict(batch.x).labels) == 7


def test_unreadable_images_are_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past Pillow's pixel bound was a DecompressionBombError traceback in `edge predict`;
    an unknown format named a BytesIO object instead of the problem."""
    Image.fromarray(digit_images(1)[0]).save(tmp_path / "d.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"junk\.png is not a readable image: unknown image format"):
        load_inputs([tmp_path / "junk.png"], digits_task())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 digit: past twice the bound
    with pytest.raises(DataError, match=r"d\.png is not a readable image: .*decompression bomb"):
        load_inputs([tmp_path / "d.png"], digits_task())


def test_csv_and_npy_rows_for_a_tabular_task(tmp_path: Path) -> None:
    task = tabular_task()
    (tmp_path / "rows.csv").write_text("id,c,a,b\n1,3,1,2\n2,0.5,-1,4\n\n")
    batch = load_inputs([tmp_path / "rows.csv"], task)
    rows = np.array([[1, 2, 3], [-1, 4, 0.5]], np.float32)
    np.testing.assert_allclose(batch.x, prepare(rows, task.preprocessing))
    assert batch.names == ["rows.csv:2", "rows.csv:3"]
    np.save(tmp_path / "rows.npy", rows)
    np.testing.assert_allclose(load_inputs([tmp_path / "rows.npy"], task).x, batch.x)
    pre = load_inputs([tmp_path / "rows.npy"], task, preprocessed=True)
    np.testing.assert_allclose(pre.x, rows)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("noheader.csv", "1,2,3\n4,5,6\n", "has no header row"),
        ("missing.csv", "a,b\n1,2\n", "lacks 1 column"),
        ("bad.csv", "a,b,c\n1,x,3\n", "line 2: a needed value is missing or not a number"),
        ("empty.csv", "a,b,c\n", "no rows"),
        ("notes.txt", "hello", "unsupported input type .txt"),
        ("photo.png", None, "takes tabular rows"),
    ],
)
def test_bad_tabular_inputs_are_data_errors(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    path = tmp_path / name
    if content is None:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_inputs([path], tabular_task())


def test_bad_image_inputs_are_data_errors(tmp_path: Path) -> None:
    task = digits_task()
    (tmp_path / "rows.csv").write_text("a\n1\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    np.save(tmp_path / "floats.npy", np.zeros((2, 8, 8)))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = {
        "rows.csv": "takes images, not .csv",
        "broken.png": "not a readable image",
        "floats.npy": "raw images must be uint8",
        "objects.npy": "object arrays are refused",
        "absent.png": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_inputs([tmp_path / name], task)


# ------------------------------------------------------------------ CLI and bench


def test_cli_predict_table_and_json(tmp_path: Path, tabular: Path, keys: tuple[Path, Path]) -> None:
    (tmp_path / "rows.csv").write_text("a,b,c\n1,2,3\n9,-4,0\n")
    runner = CliRunner()
    args = ["predict", str(tabular), str(tmp_path / "rows.csv"), "--key", str(keys[1])]
    shown = runner.invoke(app, args, terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "rows.csv:2" in shown.output and "rows.csv:3" in shown.output
    out = runner.invoke(app, [*args, "--json", "--format", "tflite"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["format"] == "tflite" and len(data["predictions"]) == 2
    x = prepare(np.array([[1, 2, 3], [9, -4, 0]], np.float32), tabular_task().preprocessing)
    labels = [tabular_task().classes[i] for i in Linear.for_task(tabular_task())(x).argmax(1)]
    assert [p["label"] for p in data["predictions"]] == labels


def test_cli_errors_are_fedge_errors(tmp_path: Path, tabular: Path) -> None:
    _, other = make_keys(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(tabular), "x.csv", "--key", str(other)])
    assert result.exit_code != 0 and isinstance(result.exception, BundleError)
    bad_format = CliRunner().invoke(app, ["predict", str(tabular), "x.csv", "--format", "gguf"])
    assert bad_format.exit_code == 2


@pytest.mark.slow
def test_bench_measures_every_artifact(tabular: Path, keys: tuple[Path, Path]) -> None:
    rows = bench_bundle(tabular, keys[1], warmup=2, iterations=20, batch=8, progress=False)
    assert [Path(r.file).name for r in rows] == ["model-fp32.onnx", "model-fp32.tflite"]
    for row in rows:
        assert row.error is None, row.error
        assert 0 < row.p50_ms <= row.p99_ms and row.batch == 8
        assert row.throughput > 0 and row.load_ms > 0
        assert row.self_test_passed is True and row.label_agreement == 1.0
        assert row.max_abs_diff <= 1e-5  # an fp32 artifact against its own export logits
        assert row.rss_delta_mb >= 0 and row.peak_rss_mb > row.rss_delta_mb
        assert row.size_bytes == (tabular / row.file).stat().st_size
    table = render_bench_table(rows)
    assert table.row_count == 2
    out = CliRunner().invoke(
        app, ["bench", str(tabular), "--key", str(keys[1]), "--iterations", "5", "--json"]
    )
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert [d["file"] for d in data] == [r.file for r in rows]
    assert all(d["p50_ms"] <= d["p99_ms"] for d in data)


def test_bench_counts_iterations_and_a_slowed_backend_measures_slower(
    tabular: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker body in-process, around a runtime that counts calls and can be slowed."""
    import time

    from fedge.edge.device import bench

    calls: list[int] = []
    delay = {"seconds": 0.0}
    original = EdgeModel.predict_tensor

    def counted(self: EdgeModel, x: np.ndarray) -> np.ndarray:
        calls.append(x.shape[0])
        if delay["seconds"]:
            time.sleep(delay["seconds"])
        return original(self, x)

    monkeypatch.setattr(EdgeModel, "predict_tensor", counted)
    file = "artifacts/model-fp32.onnx"
    fast = bench._measure(tabular, keys[1], file, warmup=3, iterations=40, batch=8)
    # warmup + timed batch-1 calls, one sizing call + max(3, 40 // 10) timed batch-8 calls,
    # and the self-test's 4 inputs: nothing more, nothing less.
    assert calls.count(1) == 3 + 40 and calls.count(8) == 1 + 4 and calls.count(4) == 1
    assert len(calls) == 3 + 40 + 5 + 1
    assert fast["p50_ms"] <= fast["p99_ms"] and fast["self_test_passed"] is True
    calls.clear()
    delay["seconds"] = 0.005
    slow = bench._measure(tabular, keys[1], file, warmup=1, iterations=10, batch=8)
    assert len(calls) == 1 + 10 + 1 + 3 + 1
    assert 5.0 <= slow["p50_ms"] <= slow["p99_ms"]
    assert slow["p50_ms"] > fast["p50_ms"] + 4.0
    assert slow["throughput"] <= 8 / 0.005  # 8 inputs per call at >= 5 ms a call
