"""``fedge bundle create``: models trained elsewhere (torch -> ONNX, torch -> TFLite via
litert-torch) become signed bundles that the registry, the agent and the runtime accept."""

import json
from pathlib import Path

import numpy as np
import pytest
from deploy_support import ServerThread, make_keys
from typer.testing import CliRunner

from fedge.edge.device.agent import AgentConfig, run_agent_once
from fedge.edge.device.runtime import EdgeModel
from fedge.edge.packaging import create_bundle
from fedge.shared.bundle import verify_bundle
from fedge.shared.errors import ConfigError, ModelError

LABELS = ["cat", "dog", "bird"]


def _torch_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, len(LABELS)),
    ).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    root = tmp_path_factory.mktemp("models")
    model = _torch_model()
    sample = torch.rand(1, 3, 16, 16)
    onnx_path = root / "pets.onnx"
    torch.onnx.export(
        model, (sample,), str(onnx_path), input_names=["pixels"], output_names=["scores"],
        dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}}, dynamo=False,
    )  # fmt: skip
    import litert_torch

    tflite_path = root / "pets.tflite"
    litert_torch.convert(model, (sample,)).export(str(tflite_path))
    inputs = np.random.default_rng(1).uniform(0, 1, size=(5, 3, 16, 16)).astype(np.float32)
    np.save(root / "inputs.npy", inputs)
    with torch.no_grad():
        reference = model(torch.from_numpy(inputs)).numpy()
    np.save(root / "reference.npy", reference)
    return {"onnx": onnx_path, "tflite": tflite_path, "inputs": root / "inputs.npy",
            "reference": root / "reference.npy"}  # fmt: skip


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return make_keys(tmp_path / "keys")


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_cli_packages_a_model_trained_elsewhere(tmp_path: Path, models, keys, fmt: str) -> None:
    from fedge.cli import _register, app

    _register()
    private, public = keys
    out = tmp_path / f"bundle-{fmt}"
    result = CliRunner().invoke(
        app,
        ["bundle", "create", str(models[fmt]), "--labels", ",".join(LABELS),
         "--input-shape", "3,16,16", "--version", "1.0.0", "--out", str(out),
         "--self-test", str(models["inputs"]), "--key", str(private)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = verify_bundle(out, public)
    assert manifest.labels == tuple(LABELS) and manifest.task.name == "pets"
    assert manifest.artifacts[0].format == fmt and manifest.privacy is None
    card = json.loads((out / "model_card.json").read_text())
    assert card["training"]["federated"] is False and card["training"]["record"] is None
    assert "no federated training record" in card["training"]["note"]
    inputs, reference = np.load(models["inputs"]), np.load(models["reference"])
    with EdgeModel.open(out, public) as model:
        assert model.self_test().passed
        np.testing.assert_allclose(model.predict_tensor(inputs), reference, atol=1e-3)
        assert model.predict(inputs).labels == [LABELS[i] for i in reference.argmax(1)]


def test_models_the_runtime_cannot_handle_are_refused(tmp_path: Path, models, keys) -> None:
    import onnx
    from onnx import TensorProto, helper

    private, _ = keys

    def package(path: Path, **kw):
        options = {"labels": LABELS, "input_shape": (3, 16, 16), "version": "1",
                   "signing_key": private, **kw}  # fmt: skip
        return create_bundle(path, tmp_path / f"out-{path.stem}", **options)

    two_inputs = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["a", "b"], ["y"])], "two",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    two_inputs.ir_version = 8
    onnx.save(two_inputs, str(tmp_path / "two.onnx"))
    with pytest.raises(ModelError, match="exactly one input"):
        package(tmp_path / "two.onnx", input_shape=(3,))

    ints = helper.make_model(
        helper.make_graph(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "ints",
            [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )  # fmt: skip
    ints.ir_version = 8
    onnx.save(ints, str(tmp_path / "ints.onnx"))
    with pytest.raises(ModelError, match="float32"):
        package(tmp_path / "ints.onnx", input_shape=(3,))

    with pytest.raises(ModelError, match="3 outputs but 2 labels"):
        package(models["onnx"], labels=["a", "b"])
    with pytest.raises(ModelError, match="neither"):
        package(models["onnx"], input_shape=(3, 32, 32))
    with pytest.raises(ConfigError, match=r"only \.onnx and \.tflite"):
        package(tmp_path / "model.pt")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="self-test inputs"):
        package(models["onnx"], self_test=tmp_path / "bad.npy")


def test_packaged_bundle_is_published_and_activated_by_the_agent(
    tmp_path: Path, models, keys
) -> None:
    from fedge.server.registry.api import create_app
    from fedge.server.registry.devices import DeviceStore
    from fedge.server.registry.publish import publish_bundle
    from fedge.server.registry.store import Registry

    private, public = keys
    bundle = tmp_path / "pets-bundle"
    create_bundle(models["tflite"], bundle, labels=LABELS, input_shape=(3, 16, 16),
                  version="pets-1", signing_key=private)  # fmt: skip
    data = tmp_path / "registry"
    publish_bundle(Registry(data), bundle, public, "stable")
    token = DeviceStore(data).add("cam-1")
    server = ServerThread(create_app(data)).start()
    try:
        config = AgentConfig(server.url, "stable", tmp_path / "device", token, public)
        result = run_agent_once(config)
    finally:
        server.stop()
    assert (result.action, result.active_version, result.health) == ("activated", "pets-1", "ok")
    with EdgeModel.open(tmp_path / "device" / "current", public) as model:
        assert model.self_test().passed and model.artifact.format == "tflite"


def test_packaging_runs_without_torch(tmp_path: Path, models, keys) -> None:
    """`fedge bundle create` and the fleet protocol need neither torch nor flwr."""
    import subprocess
    import sys

    from test_edge_torch_free import BLOCKER

    private, public = keys
    script = BLOCKER + (
        "import sys\n"
        "from fedge.edge.packaging import create_bundle\n"
        "import fedge.shared.fleet_protocol, fedge.edge.device.agent\n"
        "create_bundle(sys.argv[1], sys.argv[2], labels=['cat', 'dog', 'bird'],\n"
        "              input_shape=(3, 16, 16), version='1', signing_key=sys.argv[3])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
    )
    out = tmp_path / "no-torch-bundle"
    done = subprocess.run(
        [sys.executable, "-c", script, str(models["onnx"]), str(out), str(private)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert verify_bundle(out, public).version == "1"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"version": "../../x"}, "version '../../x' is not valid"),  # signed, unpublishable
        ({"atol": float("nan")}, "--atol must be a positive number"),  # was a JSON error
        ({"atol": -1.0}, "--atol must be a positive number"),  # was "fails its own self-test"
    ],
)
def test_bad_options_are_refused_before_packaging(
    tmp_path: Path, options: dict, message: str
) -> None:
    base = {"labels": LABELS, "input_shape": (3, 16, 16), "version": "1"}
    with pytest.raises(ConfigError, match=message):
        create_bundle(tmp_path / "m.onnx", tmp_path / "out", **{**base, **options})
    assert not (tmp_path / "out").exists()


def test_force_over_a_file_or_a_link_is_refused(tmp_path: Path) -> None:
    """``--out FILE --force`` crashed in shutil.rmtree (NotADirectoryError traceback)."""
    options = {"labels": LABELS, "input_shape": (3, 16, 16), "version": "1", "force": True}
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path)
    for out in (tmp_path / "file", tmp_path / "link"):
        with pytest.raises(ConfigError, match="is not a bundle directory"):
            create_bundle(tmp_path / "m.onnx", out, **options)
    assert (tmp_path / "file").read_text() == "keep me"
