"""Bring your own model: factories, timm architectures, head detection and weights files."""

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from export_support import make_key

from fedge.client.site_checks import check_data
from fedge.edge.export.pipeline import export_bundle
from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError, ModelError
from fedge.shared.ml.checkpoint import save_checkpoint
from fedge.shared.ml.data import load_data, task_for_run
from fedge.shared.ml.models import build_model, build_run_model, head_path
from fedge.shared.ml.training import make_loader, train
from fedge.shared.ml.weights import load_init_weights
from fedge.shared.preprocess import prepare

FACTORY = """
from torch import nn

class Net(nn.Module):
    fedge_head = "out"

    def __init__(self, channels, size, num_classes):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * size * size, 32), nn.ReLU(),
        )
        self.out = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.out(self.body(x))

def make(num_classes, input_shape):
    return Net(input_shape[0], input_shape[1], num_classes)

def two_heads(num_classes, input_shape):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, num_classes), nn.Linear(num_classes, num_classes)
    )

def named(num_classes, input_shape):
    return two_heads(num_classes, input_shape), "1"

def not_a_module(num_classes, input_shape):
    return 42

def broken_head(num_classes, input_shape):
    net = make(num_classes, input_shape)
    net.fedge_head = "nothing"
    return net
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A model module the user wrote, importable from sys.path."""
    name = f"byo_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def digits_run(tmp_path: Path, model: torch.nn.Module, cfg: RunConfig, steps: int = 1) -> Path:
    """Train ``model`` ``steps`` batches on digits and save it as a run directory."""
    task = task_for_run(cfg)
    data = load_data("digits", task)
    x = prepare(data.x, task.preprocessing)
    loader = make_loader(x[: 32 * steps], data.y[: 32 * steps], 32, shuffle=True)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    train(model, loader, 1, 0.05, torch.device("cpu"))
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "model.safetensors", model.state_dict(), 1, cfg.model, task,
                    cfg.to_flower())  # fmt: skip
    return run


def test_factory_model_builds_trains_and_exports(factory_module: str, tmp_path: Path) -> None:
    cfg = RunConfig(model=f"{factory_module}:make", mode="head")
    model = build_run_model(cfg, task_for_run(cfg))
    assert head_path(model, cfg.model) == "out"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"out.weight", "out.bias"}
    run = digits_run(tmp_path, model, cfg)
    key, _ = make_key(tmp_path)
    report = export_bundle(run, tmp_path / "bundle", formats=("onnx",), quantize=("none",),
                           signing_key=key, progress=False, max_accuracy_drop=100.0)  # fmt: skip
    assert report.failed == [] and [r["status"] for r in report.rows] == ["pass"]


def test_timm_model_builds_and_exports(tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is not installed (pip install 'fedge[timm]')")
    cfg = RunConfig(model="timm:mobilenetv3_small_050", mode="head")
    model = build_run_model(cfg, task_for_run(cfg))
    assert head_path(model, cfg.model) == "classifier"  # from timm's pretrained_cfg
    run = digits_run(tmp_path, model, cfg)
    key, _ = make_key(tmp_path)
    report = export_bundle(run, tmp_path / "bundle", formats=("onnx",), quantize=("none",),
                           signing_key=key, progress=False, max_accuracy_drop=100.0)  # fmt: skip
    assert report.failed == [] and [r["status"] for r in report.rows] == ["pass"]


def test_unknown_timm_architecture_is_a_model_error() -> None:
    pytest.importorskip("timm", reason="timm is not installed (pip install 'fedge[timm]')")
    cfg = RunConfig(model="timm:no_such_net")
    with pytest.raises(ModelError, match="no architecture 'no_such_net'"):
        build_model(cfg.model, task_for_run(cfg))


def test_head_is_declared_returned_or_refused_when_ambiguous(factory_module: str) -> None:
    task = task_for_run(RunConfig())
    assert head_path(build_model(f"{factory_module}:named", task), "x") == "1"
    with pytest.raises(ModelError, match=r"cannot tell its head.*1, 2 all give 10 outputs"):
        build_model(f"{factory_module}:two_heads", task)
    with pytest.raises(ModelError, match=r"not a torch nn\.Module"):
        build_model(f"{factory_module}:not_a_module", task)
    with pytest.raises(ModelError, match="declares head 'nothing'"):
        build_model(f"{factory_module}:broken_head", task)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        build_model(f"{factory_module}:missing", task)


def test_model_names_are_checked_without_importing() -> None:
    assert RunConfig(model="my_pkg.nets:build").model == "my_pkg.nets:build"
    for bad in ("my pkg:build", "pkg:", "timm:bad name", "resnet19"):
        with pytest.raises(ConfigError):
            RunConfig(model=bad)


def test_client_start_check_imports_the_factory(factory_module: str, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'model = "{factory_module}:make"\n', encoding="utf-8")
    check_data("digits#0/2", good)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "not_installed_anywhere.nets:build"\n', encoding="utf-8")
    with pytest.raises(ModelError, match="importable on every site and on the coordinator"):
        check_data("digits#0/2", bad)


def test_weights_with_a_wrapper_prefix_load(tmp_path: Path) -> None:
    task = task_for_run(RunConfig())
    source = build_model("cnn", task)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = build_model("cnn", task)
    report = load_init_weights(target, "cnn", path)
    assert report.loaded_keys == len(source.state_dict()) and not report.new_head
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)
    lightning = tmp_path / "lightning.safetensors"
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in source.state_dict().items()}, lightning)
    report = load_init_weights(build_model("cnn", task), "cnn", lightning)
    assert report.loaded_keys == len(source.state_dict())


def test_a_wrong_weights_file_is_a_one_line_error(tmp_path: Path) -> None:
    task = task_for_run(RunConfig())
    path = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", task).state_dict(), path)
    with pytest.raises(ModelError) as info:
        load_init_weights(build_model("cnn", task), "cnn", path)
    message = str(info.value)
    assert "\n" not in message and "backbone not loaded" in message
    assert "6 missing keys (e.g. 'features.0.weight'" in message
    assert "unexpected keys" in message and "'features.1.weight'" in message


def test_new_head_when_the_class_count_differs(tmp_path: Path) -> None:
    task = task_for_run(RunConfig())
    path = tmp_path / "five.pt"
    five = build_model("cnn", task, num_classes=5)
    torch.save(five.state_dict(), path)
    model = build_model("cnn", task)
    report = load_init_weights(model, "cnn", path)
    assert report.new_head and model.classifier.out_features == 10
    assert np.allclose(model.features[0].weight.detach(), five.features[0].weight.detach())
