"""Build the models fedge fine-tunes: a small CNN, an MLP and torchvision classifiers.

Every model exposes its classifier head under a known attribute path
(``HEAD_PATH``), which ``head`` mode keeps trainable while freezing the rest.
"""

from collections.abc import Iterable

import torch
from torch import nn

from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError
from fedge.shared.model_names import check_model_name, is_torchvision
from fedge.shared.tasks import TaskSpec

# Attribute path of each model's classifier head, as it appears in state_dict keys.
HEAD_PATH = {
    "cnn": "classifier",
    "mlp": "classifier",
    "mobilenet_v3_small": "classifier.3",
    "resnet18": "fc",
    "resnet50": "fc",
}


class SmallCNN(nn.Module):
    """Two conv layers and a classifier: enough for digits-sized images."""

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (size // 2) * (size // 2), 64),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Two hidden layers over flattened inputs; for tabular data."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _torchvision_model(name: str, num_classes: int) -> nn.Module:
    """A torchvision classifier with random weights and a ``num_classes`` head.

    torchvision's published ``.pth`` files (ImageNet heads) still load into it:
    ``fedge.shared.ml.weights`` loads their backbone and keeps this new head.
    """
    from torchvision import models as tv

    return getattr(tv, name)(weights=None, num_classes=num_classes)


def build_model(name: str, task: TaskSpec, num_classes: int | None = None) -> nn.Module:
    """A model for ``task`` with random weights (``num_classes`` overrides the task's)."""
    check_model_name(name)
    classes = num_classes or task.num_classes
    shape = task.input_shape
    if is_torchvision(name):
        if task.kind != "image":
            raise ConfigError(f"model {name!r} needs an image task, not {task.kind!r}")
        return _torchvision_model(name, classes)
    if name == "cnn":
        if task.kind != "image":
            raise ConfigError("model 'cnn' needs an image task; use 'mlp' for tabular data")
        return SmallCNN(shape[0], shape[1], classes)
    features = 1
    for dim in shape:
        features *= dim
    return MLP(features, classes)


def head_keys(model: nn.Module, model_name: str) -> set[str]:
    """state_dict keys that belong to the classifier head."""
    prefix = HEAD_PATH[model_name] + "."
    return {k for k in model.state_dict() if k.startswith(prefix)}


def freeze_for_mode(model: nn.Module, model_name: str, mode: str) -> None:
    """``head``: only the classifier trains; ``full``: everything trains."""
    heads = head_keys(model, model_name)
    for key, param in model.named_parameters():
        param.requires_grad = mode == "full" or key in heads


def exchanged_keys(model: nn.Module, mode: str) -> list[str]:
    """The state_dict entries that travel between server and clients, in a fixed order.

    ``head``: the trainable parameters only. ``full``: all floating-point
    entries, including BatchNorm running statistics, which are learned too.
    Integer bookkeeping buffers (``num_batches_tracked``) never travel.
    """
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if mode == "head":
        return [k for k in state if k in trainable]
    return [k for k, v in state.items() if v.is_floating_point()]


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)

def make_dp_compatible(model: nn.Module) -> nn.Module:
    """Replace layers DP-SGD cannot handle (BatchNorm -> GroupNorm), via Opacus."""
    from opacus.validators import ModuleValidator

    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    return model


def build_run_model(cfg: RunConfig, task: TaskSpec, load_weights: bool = True) -> nn.Module:
    """The run's model, with its initial weights and trainable parts set by ``cfg.mode``."""
    model = build_model(cfg.model, task)
    if cfg.privacy.dp == "record":
        model = make_dp_compatible(model)
    if load_weights and cfg.init_weights:
        from fedge.shared.ml.weights import load_init_weights  # weights imports this module

        load_init_weights(model, cfg.model, cfg.init_weights)
    freeze_for_mode(model, cfg.model, cfg.mode)
    return model
