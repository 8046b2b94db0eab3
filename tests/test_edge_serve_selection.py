"""Serving picks the fastest verified artifact, measured on the device, and shows the choice."""

import json
from pathlib import Path

import pytest
from edge_device_support import ArtifactPlan, make_bundle, make_keys
from starlette.testclient import TestClient

from fedge.edge.device import selection
from fedge.edge.device.activation import AgentDir
from fedge.edge.device.runtime import select_artifact
from fedge.edge.device.selection import (
    CHOICE_FILE,
    choose_and_record,
    choose_fastest_artifact,
    load_choice,
)
from fedge.edge.device.serve import ServeConfig, create_app
from fedge.shared.bundle import read_manifest
from fedge.shared.errors import BundleError

# The smallest artifact is the slow one (hundreds of extra nodes in a tiny file).
SLOW_SMALL = ArtifactPlan("model-int8-slow.onnx", precision="int8", slow_ops=400)
FAST_BIG = ArtifactPlan("model-fp32.onnx", extra_fp32=20_000)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Path:
    root = tmp_path_factory.mktemp("sel") / "bundle"
    return make_bundle(root, keys[0], plans=(SLOW_SMALL, FAST_BIG))


def test_the_fastest_not_the_smallest_is_chosen(bundle: Path, keys) -> None:
    manifest = read_manifest(bundle)
    assert select_artifact(manifest).file == "artifacts/model-int8-slow.onnx"  # by size
    choice = choose_fastest_artifact(bundle, keys[1])
    assert choice.file == "artifacts/model-fp32.onnx" and choice.reason == "fastest"
    assert set(choice.p50_ms) == {"artifacts/model-int8-slow.onnx", "artifacts/model-fp32.onnx"}
    assert (
        choice.p50_ms["artifacts/model-fp32.onnx"] < choice.p50_ms["artifacts/model-int8-slow.onnx"]
    )
    only = choose_fastest_artifact(bundle, keys[1], precision="int8")
    assert only.file == "artifacts/model-int8-slow.onnx" and only.reason == "only-candidate"


def test_an_artifact_failing_its_self_test_here_is_never_chosen(tmp_path: Path, keys) -> None:
    root = make_bundle(tmp_path / "b", keys[0], plans=(SLOW_SMALL, FAST_BIG),
                       corrupt_expectation="artifacts/model-fp32.onnx")  # fmt: skip
    choice = choose_fastest_artifact(root, keys[1])
    assert choice.file == "artifacts/model-int8-slow.onnx"
    assert "self-test failed" in choice.skipped["artifacts/model-fp32.onnx"]


def test_no_runnable_artifact_is_a_clear_error(tmp_path: Path, keys) -> None:
    plans = (ArtifactPlan("a.onnx", passed=False), ArtifactPlan("b.onnx", passed=False))
    root = make_bundle(tmp_path / "b", keys[0], plans=plans)
    with pytest.raises(BundleError, match="no validated artifact"):
        choose_fastest_artifact(root, keys[1])


def test_the_choice_is_recorded_once_and_reused(
    bundle: Path, keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / CHOICE_FILE
    first = choose_and_record(bundle, keys[1], record)
    assert json.loads(record.read_text())["file"] == first.file == "artifacts/model-fp32.onnx"

    def must_not_measure(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured again although a choice was recorded")

    monkeypatch.setattr(selection, "choose_fastest_artifact", must_not_measure)
    assert choose_and_record(bundle, keys[1], record) == first
    assert load_choice(record) == first
    with pytest.raises(AssertionError, match="measured again"):  # other filters: measure
        choose_and_record(bundle, keys[1], record, precision="int8")


def test_serve_runs_the_fastest_and_shows_it_in_metrics(bundle: Path, keys) -> None:
    with TestClient(create_app(ServeConfig(trusted_key=keys[1], bundle=bundle))) as client:
        answer = client.post("/predict", json={"inputs": [[[1] * 8] * 8]}).json()
        assert answer["artifact"] == "artifacts/model-fp32.onnx"
        assert client.get("/healthz").json()["selection"] == "fastest"
        text = client.get("/metrics").text
    assert ('fedge_artifact_selected{artifact="artifacts/model-fp32.onnx",reason="fastest"} 1'
            in text)  # fmt: skip
    assert 'fedge_artifact_latency_seconds{artifact="model-int8-slow.onnx"}' in text
    smallest = ServeConfig(trusted_key=keys[1], bundle=bundle, select="smallest")
    with TestClient(create_app(smallest)) as client:
        answer = client.post("/predict", json={"inputs": [[[1] * 8] * 8]}).json()
        assert answer["artifact"] == "artifacts/model-int8-slow.onnx"


def test_agent_mode_serves_the_recorded_choice(bundle: Path, keys, tmp_path: Path) -> None:
    import shutil

    agent_dir = AgentDir(tmp_path / "device")
    agent_dir.prepare()
    shutil.copytree(bundle, agent_dir.version_dir("v1"))
    agent_dir.activate("v1")
    # What the agent does after activating a version: measure once, record the choice.
    choice = choose_and_record(agent_dir.current_link, keys[1], agent_dir.root / CHOICE_FILE)
    config = ServeConfig(trusted_key=keys[1], agent_dir=agent_dir.root)
    with TestClient(create_app(config)) as client:
        answer = client.post("/predict", json={"inputs": [[[1] * 8] * 8]}).json()
        stats = client.app.state.metrics.stats()
    assert answer["artifact"] == choice.file == "artifacts/model-fp32.onnx"
    assert stats["artifact"] == choice.file and stats["artifact_selection"] == "fastest"
