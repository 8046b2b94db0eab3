"""The artifact job's pieces without a federation: exact encoding, bounds, staging, gate, noise."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedge.client.artifact_job import _checked_payload, _manifest
from fedge.edge.export.federated_gate import gate
from fedge.server.artifact_job import count_noise
from fedge.server.privacy import site_level_epsilon
from fedge.shared import artifact_job_dir
from fedge.shared import federated_counts as fc
from fedge.shared.bundle import ArtifactEntry, Manifest
from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError


def secagg_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """What SecAggPlusWorkflow hands the strategy, times K: Flower's own (de)quantization.

    Each site: weight 1 of max weight 1 (ratio 1, so the vector is not rescaled),
    stochastic quantization to ``QUANTIZATION_RANGE`` levels over ``[-C, C]``; the server
    sums modulo ``MODULUS_RANGE`` (the masks cancel), dequantizes, removes the K-1 offsets
    and divides by the summed ratios (K).
    """
    k = len(vectors)
    c, t = fc.CLIPPING_RANGE, fc.QUANTIZATION_RANGE
    summed = sum(quantize([v], c, t)[0].astype(np.int64) for v in vectors) % fc.MODULUS_RANGE
    mean = (dequantize([summed], c, t)[0] - (k - 1) * c) * (t / (k * t))
    return mean * k


@pytest.mark.parametrize("sites", [1, 3, fc.MAX_SITES])
def test_secagg_quantization_decodes_exact_integer_sums(sites: int) -> None:
    rng = np.random.default_rng(sites)
    counts = [rng.integers(0, fc.BASE**2, 200) for _ in range(sites)]
    counts[0][:3] = [0, fc.BASE**2 - 1, fc.BASE]  # the edges of the range
    encoded = [fc.encode(c, 2) for c in counts]
    assert all(float(e.max()) < fc.CLIPPING_RANGE and float(e.min()) >= 0 for e in encoded)
    np.testing.assert_array_equal(fc.decode_sum(secagg_sum(encoded), 2, 200), sum(counts))


def test_encoding_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="must lie in"):
        fc.encode(np.array([-1]), 2)
    with pytest.raises(ValueError, match="must lie in"):
        fc.encode(np.array([fc.BASE**2]), 2)
    with pytest.raises(ValueError, match="not integers"):
        fc.decode_sum(np.array([0.5 / fc.SCALE, 0.0]), 2, 1)
    with pytest.raises(ValueError, match="expected"):
        fc.decode_sum(np.zeros(3), 2, 1)
    with pytest.raises(ConfigError):
        fc.check_sites(fc.MAX_SITES + 1)


def job(**changes: object) -> fc.ArtifactJob:
    values: dict[str, object] = {
        "kind": "evaluate", "classes": 10, "artifacts": ("a.onnx", "b.tflite"), "confusion": True
    }  # fmt: skip
    values.update(changes)
    return fc.ArtifactJob(**values)  # type: ignore[arg-type]


def test_job_round_trips_and_lays_out_counts() -> None:
    j = job()
    assert fc.ArtifactJob.from_json(j.to_json()) == j
    assert j.length == fc.HEAD + 2 * (2 + 100) and j.payload_arrays == 4
    eye = np.eye(10, dtype=np.int64)
    vector = fc.evaluation_vector(j, 10, 9, [(8, 7, eye), (6, 5, 2 * eye)])
    sums = fc.evaluation_sums(j, vector * 3)
    assert (sums.sites, sums.examples, sums.reference_correct) == (3, 30, 27)
    assert sums.artifacts["b.tflite"].correct == 18 and sums.artifacts["b.tflite"].agree == 15
    np.testing.assert_array_equal(sums.artifacts["b.tflite"].confusion, 6 * eye)
    assert fc.evaluation_sensitivity(j) == math.sqrt(2 + 4 + 2)


@pytest.mark.parametrize(
    "changes",
    [
        {"artifacts": ("../etc/passwd",)},
        {"artifacts": (".hidden",)},
        {"artifacts": ("a.onnx", "a.onnx")},
        {"artifacts": tuple(f"m{i}.onnx" for i in range(fc.MAX_ARTIFACTS + 1))},
        {"artifacts": ()},
        {"classes": fc.MAX_CONFUSION_CLASSES + 1},
        {"kind": "train"},
        {"digits": 9},
        {"kind": "histogram", "fmt": "onnx", "total_bins": fc.MAX_VECTOR + 1},
        {"kind": "histogram", "fmt": "pickle", "total_bins": 10},
    ],
)
def test_job_refuses_what_a_coordinator_should_not_ask(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="artifact job refused"):
        job(**changes)


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "not json",
        json.dumps({**json.loads(job().to_json()), "extra": 1}),
        json.dumps({**json.loads(job().to_json()), "classes": "10"}),
        json.dumps({**json.loads(job().to_json()), "classes": True}),
        "x" * (2 * fc.MAX_SPEC_CHARS + 1),
        "[" * 100_000 + "]" * 100_000,  # deeper than json's stack: was a RecursionError
    ],
)
def test_job_json_from_a_coordinator_is_checked(text: str) -> None:
    with pytest.raises(ConfigError, match="artifact job refused"):
        fc.ArtifactJob.from_json(text)


@pytest.mark.parametrize(
    "content",
    [b"\xff", b"[]", b"{}", b"[" * 500_000 + b"]" * 500_000],  # the last: a RecursionError
)
def test_site_refuses_a_malformed_manifest_with_the_reason(content: bytes) -> None:
    """The job's manifest is not signed: whatever the coordinator sends fails as a refusal."""
    with pytest.raises(ConfigError, match="artifact job refused: bad manifest"):
        _manifest(content, RunConfig(), job())


def test_site_checks_the_payload_before_using_it() -> None:
    j = job()
    ok = [np.zeros(3, np.uint8) for _ in range(j.payload_arrays)]
    assert len(_checked_payload(j, ok)) == 4
    with pytest.raises(ConfigError, match="arrays sent"):
        _checked_payload(j, ok[:3])
    with pytest.raises(ConfigError, match="flat uint8"):
        _checked_payload(j, [*ok[:3], np.zeros(3, np.float32)])


def test_job_folder_round_trip_and_refusals(tmp_path: Path) -> None:
    j = job()
    files = {"manifest.json": b"{}", "model.safetensors": b"w", "a.onnx": b"a", "b.tflite": b"b"}
    artifact_job_dir.stage_job(tmp_path, j, files, 3)
    staged = artifact_job_dir.read_job(tmp_path)
    assert staged.job == j and staged.min_sites == 3
    assert [p.tobytes() for p in staged.payload] == list(files.values())
    folder = artifact_job_dir.job_dir(tmp_path)
    (folder / "a.onnx").unlink()
    (folder / "a.onnx").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a regular file"):
        artifact_job_dir.read_job(tmp_path)
    data = json.loads((folder / "job.json").read_text())
    (folder / "job.json").write_text(json.dumps({**data, "files": ["../x", *data["files"][1:]]}))
    with pytest.raises(ConfigError, match="bad payload file name"):
        artifact_job_dir.read_job(tmp_path)
    with pytest.raises(ConfigError, match="no federated export job"):
        artifact_job_dir.read_job(tmp_path / "nothing")


def entry(name: str, precision: str) -> ArtifactEntry:
    return ArtifactEntry(f"artifacts/{name}", name.rsplit(".", 1)[1], precision, "none",
                         "0" * 64, 100, (), ())  # fmt: skip


def test_gate_fails_a_drop_past_the_budget_and_a_broken_fp32_conversion() -> None:
    entries = (entry("good.onnx", "fp32"), entry("bad.onnx", "int8"), entry("off.tflite", "fp32"))
    manifest = Manifest("f", "id", "v", "t", None, (), (), (), entries, None, {}, None, None, {})  # type: ignore[arg-type]
    counts = {
        "good.onnx": fc.ArtifactCounts(90, 100, None),
        "bad.onnx": fc.ArtifactCounts(80, 85, None),
        "off.tflite": fc.ArtifactCounts(90, 100, None),
    }
    sums = fc.EvaluationSums(3, 100, 90, counts)
    reference = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    probe = {"good.onnx": reference, "bad.onnx": reference, "off.tflite": reference + 0.5}
    results = {r.artifact: r for r in gate(manifest, sums, probe, reference, max_accuracy_drop=5)}
    assert results["good.onnx"].passed and results["good.onnx"].accuracy == 0.9
    assert not results["bad.onnx"].passed and "drop 10.00 points" in results["bad.onnx"].reason
    assert not results["off.tflite"].passed and "fp32 logits differ" in results["off.tflite"].reason
    assert gate(manifest, sums, probe, reference, max_accuracy_drop=11)[1].passed


def test_count_noise_is_off_by_default_and_accounted_when_asked() -> None:
    j = job(confusion=False)
    sums = fc.evaluation_vector(j, 100, 90, [(80, 85, None), (70, 75, None)]) * 3
    exact, dp = count_noise(j, sums, RunConfig())
    assert exact == [float(v) for v in sums] and dp["mechanism"] is None
    cfg = RunConfig().replace(privacy={"count_noise_multiplier": 2.0, "delta": 1e-5})
    noisy, dp = count_noise(j, sums, cfg, seed=1)
    assert noisy != exact and noisy[fc.SLOT_SITES] == 3
    assert dp["sigma"] == 2.0 * fc.evaluation_sensitivity(j)
    assert dp["epsilon"] == site_level_epsilon(2.0, 1.0, 1, 1e-5)
    from fedge.edge.export.federated_export import composed_privacy
    from fedge.shared.activation_histograms import BinSpec, TensorBins

    spec = BinSpec("fine", (TensorBins("t", -1.0, 1.0, 4, 16),))
    hist = job(kind="histogram", fmt="onnx", bin_spec=spec.to_json(), total_bins=4)
    noisy_bins, hist_dp = count_noise(hist, np.array([5, 0, 7, 1]), cfg, seed=2)
    assert hist_dp["l2_sensitivity"] == 16.0 and min(noisy_bins) >= 0
    assert noisy_bins != [5.0, 0.0, 7.0, 1.0]
    total = composed_privacy([hist_dp, hist_dp, dp])
    assert total is not None and total["epsilon"] == site_level_epsilon(2.0, 1.0, 3, 1e-5)
    assert composed_privacy([]) is None


def test_run_config_job_is_validated() -> None:
    assert RunConfig().job == "train"
    assert RunConfig.from_flower({"job": "artifacts"}).job == "artifacts"
    with pytest.raises(ConfigError, match="unknown job"):
        RunConfig.from_flower({"job": "mine-bitcoin"})


def test_export_of_a_task_without_central_data_goes_to_the_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer
    from typer.testing import CliRunner

    from fedge.cli.export import export, validate
    from fedge.shared.errors import ConnectionFailed
    from fedge.shared.ml.checkpoint import save_checkpoint
    from fedge.shared.ml.data import task_for_run
    from fedge.shared.ml.models import build_run_model
    from fedge.shared.processes import free_port
    from fedge.shared.signing import generate_signing_key

    cfg = RunConfig(task="images", classes="a,b", image_size=8, run_dir=str(tmp_path / "run"))
    task = task_for_run(cfg)
    model = build_run_model(cfg, task, load_weights=False)
    run = tmp_path / "run"
    save_checkpoint(run / "model.safetensors", model.state_dict(), 1, "cnn", task, cfg.to_flower())
    key = tmp_path / "signing.key"
    generate_signing_key(key)
    app = typer.Typer()
    app.command()(export)
    app.command()(validate)
    server = f"127.0.0.1:{free_port()}"  # nothing listens: the federated path fails fast
    common = ["export", str(run), "--key", str(key), "--server", server, "--insecure"]
    federated = CliRunner().invoke(app, common)
    assert isinstance(federated.exception, ConnectionFailed), federated.output
    assert "evaluate at the sites" in str(federated.exception)
    central = CliRunner().invoke(app, [*common, "--central"])
    assert isinstance(central.exception, ConfigError) and "--eval-data" in str(central.exception)
