"""Built-in models, fine-tuning modes, exchanged keys and loading initial weights."""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError, ModelError
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import (
    HEAD_PATH,
    build_model,
    build_run_model,
    exchanged_keys,
    freeze_for_mode,
)
from fedge.shared.ml.weights import load_init_weights, read_state_dict
from fedge.shared.model_names import ALL_MODELS
from fedge.shared.tasks import TabularPreprocessing, TaskSpec

# Small inputs keep the torchvision backbones cheap: 32x32 is their smallest size.
SMALL = {"cnn": 8, "mlp": 8, "mobilenet_v3_small": 32, "resnet18": 32, "resnet50": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(model: str) -> TaskSpec:
    return task_for_run(RunConfig(task="digits", model=model, image_size=SMALL[model]))


def test_every_builtin_model_has_a_head_path() -> None:
    assert set(HEAD_PATH) == set(ALL_MODELS)


@pytest.mark.slow  # imports torchvision, builds resnet50 (25M parameters)
@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_gives_logits_per_class_and_head_mode_freezes_backbone(name: str) -> None:
    torch.manual_seed(0)
    task = _task(name)
    model = build_model(name, task)
    head = model.get_submodule(HEAD_PATH[name])
    assert isinstance(head, nn.Linear) and head.out_features == task.num_classes == 10
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(3, *task.input_shape))
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()

    freeze_for_mode(model, name, "head")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{HEAD_PATH[name]}.weight", f"{HEAD_PATH[name]}.bias"}
    assert exchanged_keys(model, "head") == [f"{HEAD_PATH[name]}.weight", f"{HEAD_PATH[name]}.bias"]

    freeze_for_mode(model, name, "full")
    assert all(p.requires_grad for p in model.parameters())
    full = exchanged_keys(model, "full")
    state = model.state_dict()
    assert full == [k for k in state if not k.endswith("num_batches_tracked")]
    assert set(dict(model.named_parameters())) <= set(full)
    has_batchnorm = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_batchnorm == (name in ("mobilenet_v3_small", "resnet18", "resnet50"))
    if has_batchnorm:
        assert any(k.endswith("running_mean") for k in full)
        assert any(k.endswith("running_var") for k in full)
        assert any(k.endswith("num_batches_tracked") for k in state)


def test_head_mode_trains_only_the_head() -> None:
    task = _task("cnn")
    model = build_run_model(RunConfig(model="cnn", mode="head"), task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = nn.functional.cross_entropy(model(torch.randn(4, *task.input_shape)), torch.arange(4))
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_mlp_on_tabular_and_image_models_refuse_tabular() -> None:
    columns = tuple(f"f{i}" for i in range(30))
    task = TaskSpec(
        "tabular", ("no", "yes"), TabularPreprocessing(columns, (0.0,) * 30, (1.0,) * 30)
    )
    model = build_model("mlp", task)
    assert model(torch.randn(5, 30)).shape == (5, 2)
    with pytest.raises(ConfigError, match="'cnn' needs an image task"):
        build_model("cnn", task)
    with pytest.raises(ConfigError, match="needs an image task"):
        build_model("resnet18", task)
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        build_model("vgg", task)


def test_record_level_dp_swaps_batchnorm_for_groupnorm() -> None:
    cfg = RunConfig(model="resnet18", image_size=32).replace(privacy={"dp": "record"})
    model = build_run_model(cfg, task_for_run(cfg))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- initial weights -------------------------------------------------------------------------


def test_pt_and_safetensors_state_dicts_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    task = _task("cnn")
    torch.manual_seed(1)
    source = build_model("cnn", task)
    pt = tmp_path / "w.pt"
    # A DataParallel-style file, wrapped the way training scripts save it.
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, pt)
    st = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(st))
    for path in (pt, st):
        torch.manual_seed(2)
        target = build_model("cnn", task)
        report = load_init_weights(target, "cnn", path)
        assert not report.new_head
        assert report.loaded_keys == len(source.state_dict())
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_build_run_model_loads_init_weights_then_freezes(tmp_path: Path) -> None:
    task = _task("cnn")
    source = build_model("cnn", task)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    cfg = RunConfig(model="cnn", mode="head", init_weights=str(path))
    model = build_run_model(cfg, task)
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    assert [k for k, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]


def test_torchvision_imagenet_file_loads_backbone_and_keeps_new_head(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(weights=None)  # random, but a 1000-class head
    # torchvision's published ResNet files predate BatchNorm's num_batches_tracked buffer.
    state = {k: v for k, v in imagenet.state_dict().items() if "num_batches_tracked" not in k}
    with torch.no_grad():
        for key, value in state.items():
            if "running_var" in key:
                value.uniform_(0.5, 2.0)  # differ from a fresh model's ones
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)

    task = _task("resnet18")
    model = build_model("resnet18", task)
    head_before = model.fc.weight.detach().clone()
    report = load_init_weights(model, "resnet18", path)
    assert report.new_head
    assert report.loaded_keys == len(state) - 2  # everything but fc.weight and fc.bias
    assert torch.equal(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(model.bn1.running_var, state["bn1.running_var"])
    assert model.fc.out_features == 10
    assert torch.equal(model.fc.weight, head_before)


def test_unreadable_and_missing_weight_files(tmp_path: Path) -> None:
    task = _task("cnn")
    for name in ("junk.pt", "junk.safetensors"):
        path = tmp_path / name
        path.write_bytes(os.urandom(2048))
        with pytest.raises(ModelError, match="cannot read weights file") as error:
            load_init_weights(build_model("cnn", task), "cnn", path)
        assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match="never downloads") as error:
        read_state_dict(tmp_path / "resnet18.pth")
    assert "does not exist" in str(error.value)
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ModelError, match="holds no state_dict"):
        read_state_dict(empty)
    not_tensors = tmp_path / "numbers.pt"
    torch.save({"a": 1}, not_tensors)
    with pytest.raises(ModelError, match="not tensors"):
        read_state_dict(not_tensors)


def test_weights_of_another_architecture_do_not_fit(tmp_path: Path) -> None:
    mlp_file = tmp_path / "mlp.pt"
    torch.save(build_model("mlp", _task("mlp")).state_dict(), mlp_file)
    with pytest.raises(ModelError, match=r"does not fit model 'cnn'.*missing keys"):
        load_init_weights(build_model("cnn", _task("cnn")), "cnn", mlp_file)
    # Same architecture, other input size: shapes differ.
    big = task_for_run(RunConfig(model="cnn", image_size=16))
    big_file = tmp_path / "cnn16.pt"
    torch.save(build_model("cnn", big).state_dict(), big_file)
    with pytest.raises(ModelError, match=r"does not fit model 'cnn'.*other shapes"):
        load_init_weights(build_model("cnn", _task("cnn")), "cnn", big_file)
