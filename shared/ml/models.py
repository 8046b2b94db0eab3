"""Build the models fedge fine-tunes: built-ins, timm architectures and the user's own.

Every model has a classifier head at a known attribute path: the built-ins list
theirs (``HEAD_PATH``), a factory declares it (``fedge_head``) or it is found (timm's
``pretrained_cfg``, else the one last ``nn.Linear``). ``head`` mode trains only the
head; ``lora`` mode adds PEFT LoRA adapters to the backbone and trains them and the head.
"""

import importlib
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError, ModelError
from fedge.shared.model_names import (
    TIMM_PREFIX,
    check_model_name,
    is_factory,
    is_timm,
    is_torchvision,
)
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)
# The attribute a factory's module sets to name its classifier head (an attribute path).
HEAD_ATTRIBUTE = "fedge_head"

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


def _timm_model(name: str, task: TaskSpec, num_classes: int) -> nn.Module:
    """A timm architecture with random weights: ``pretrained=False``, nothing is downloaded."""
    if task.kind != "image":
        raise ConfigError(f"model {name!r} needs an image task, not {task.kind!r}")
    try:
        import timm
    except ImportError as e:
        raise ModelError(f"model {name!r} needs timm: pip install 'fedge[timm]'") from e
    arch = name.removeprefix(TIMM_PREFIX)
    try:
        model = timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=task.input_shape[0]
        )
    except RuntimeError as e:  # timm: "Unknown model (NAME)"
        raise ModelError(f"timm has no architecture {arch!r} ({e})") from e
    if not isinstance(model, nn.Module):
        raise ModelError(f"timm returned no nn.Module for {arch!r}")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(classifier, str) and classifier:
        setattr(model, HEAD_ATTRIBUTE, classifier)
    return model


def load_factory(name: str) -> Any:
    """Import ``package.module:callable``; the module must be importable here.

    Raises
    ------
    ModelError
        If the module cannot be imported or holds no such callable.
    """
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything while importing
        raise ModelError(
            f"cannot import model factory module {module_name!r} ({type(e).__name__}: {e}); "
            "it must be importable on every site and on the coordinator (install it or put "
            "it on PYTHONPATH)"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"module {module_name!r} has no callable {attr!r}")
    return factory


def _factory_model(name: str, task: TaskSpec, num_classes: int) -> nn.Module:
    """Call the user's factory with the task; it returns a module, or (module, head name)."""
    factory = load_factory(name)
    built = factory(num_classes=num_classes, input_shape=tuple(task.input_shape))
    head = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[1], str):
        built, head = built
    if not isinstance(built, nn.Module):
        raise ModelError(
            f"model factory {name!r} returned {type(built).__name__}, not a torch nn.Module"
        )
    if head:
        setattr(built, HEAD_ATTRIBUTE, head)
    head_path(built, name)  # fail now, not at the first round, when the head is unclear
    return built


def build_model(name: str, task: TaskSpec, num_classes: int | None = None) -> nn.Module:
    """A model for ``task`` with random weights (``num_classes`` overrides the task's)."""
    check_model_name(name)
    classes = num_classes or task.num_classes
    shape = task.input_shape
    if is_timm(name):
        return _timm_model(name, task, classes)
    if is_factory(name):
        return _factory_model(name, task, classes)
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


def head_path(model: nn.Module, model_name: str) -> str:
    """The attribute path of the classifier head (``fc``, ``classifier.3``...).

    Raises
    ------
    ModelError
        If the model declares no head and its last ``nn.Linear`` is not a clear one.
    """
    if model_name in HEAD_PATH:
        return HEAD_PATH[model_name]
    modules = dict(model.named_modules())
    declared = getattr(model, HEAD_ATTRIBUTE, None)
    if declared is not None:
        if not isinstance(declared, str) or declared not in modules or not declared:
            raise ModelError(
                f"model {model_name!r} declares head {declared!r}, which is not one of its "
                "submodules"
            )
        return declared
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"model {model_name!r} has no nn.Linear to use as its head; declare it: "
            f"set {HEAD_ATTRIBUTE} = 'NAME' on the module or return (model, 'NAME')"
        )
    last_name, last = linears[-1]
    rivals = [n for n, m in linears[:-1] if m.out_features == last.out_features]
    if rivals:
        raise ModelError(
            f"model {model_name!r}: cannot tell its head, nn.Linear layers "
            f"{', '.join([*rivals, last_name])} all give {last.out_features} outputs; "
            f"set {HEAD_ATTRIBUTE} = 'NAME' on the module or return (model, 'NAME')"
        )
    return last_name


def head_keys(model: nn.Module, model_name: str) -> set[str]:
    """state_dict keys that belong to the classifier head."""
    prefix = head_path(model, model_name) + "."
    return {k for k in model.state_dict() if k.startswith(prefix)}


def freeze_for_mode(model: nn.Module, model_name: str, mode: str) -> None:
    """``head``: only the classifier trains; ``full``: everything trains.

    ``lora``: PEFT freezes the base model itself (``add_lora``).
    """
    if mode == "lora":
        return
    heads = head_keys(model, model_name)
    for key, param in model.named_parameters():
        param.requires_grad = mode == "full" or key in heads


def lora_targets(model: nn.Module, model_name: str, targets: str = "") -> list[str]:
    """Module names LoRA adapts: ``targets`` (comma-separated), else every Linear and
    (ungrouped) Conv2d outside the head. Depthwise convolutions are left out: an adapter
    on a grouped convolution is not smaller than the layer.
    """
    chosen = [t.strip() for t in targets.split(",") if t.strip()]
    if chosen:
        return chosen
    head = head_path(model, model_name)
    found = [
        name
        for name, module in model.named_modules()
        if (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1))
        and name != head
        and not name.startswith(head + ".")
    ]
    if not found:
        raise ModelError(
            f"model {model_name!r} has no Linear or Conv2d layer for LoRA outside its head"
        )
    return found


def add_lora(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters; the head stays fully trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ModelError("mode 'lora' needs peft: pip install 'fedge[train]'") from e
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_targets(model, cfg.model, cfg.lora_targets),
        modules_to_save=[head_path(model, cfg.model)],
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # PEFT: a target that matches nothing, or an unsupported layer
        raise ModelError(f"cannot add LoRA adapters to model {cfg.model!r}: {e}") from e


def merged(model: nn.Module) -> nn.Module:
    """A plain model: LoRA adapters merged into the base weights (others as they are).

    The edge artifact then has the base model's ops and its int8 path.
    """
    merge = getattr(model, "merge_and_unload", None)
    return merge() if callable(merge) else model


def exchanged_keys(model: nn.Module, mode: str) -> list[str]:
    """The state_dict entries that travel between server and clients, in a fixed order.

    ``head`` and ``lora``: the trainable parameters only (adapters and head).
    ``full``: all floating-point entries, including BatchNorm running statistics,
    which are learned too.
    Integer bookkeeping buffers (``num_batches_tracked``) never travel.
    """
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if mode in ("head", "lora"):
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
    if cfg.mode == "lora":
        model = add_lora(model, cfg)
    return model
