"""Names of the models fedge builds, checked without torch (for config validation).

A model is named three ways: a built-in name (``cnn``, ``resnet18``...), a timm
architecture (``timm:NAME``), or a factory of the user's own (``package.module:callable``),
which every site and the coordinator must be able to import.
"""

import re

from fedge.shared.errors import ConfigError

CUSTOM_MODELS = ("cnn", "mlp")
TORCHVISION_MODELS = ("mobilenet_v3_small", "resnet18", "resnet50")
ALL_MODELS = CUSTOM_MODELS + TORCHVISION_MODELS
# Smallest input side a torchvision backbone handles (5 stride-2 stages).
TORCHVISION_MIN_SIZE = 32
TIMM_PREFIX = "timm:"
_TIMM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_FACTORY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def is_torchvision(model: str) -> bool:
    return model in TORCHVISION_MODELS


def is_timm(model: str) -> bool:
    return model.startswith(TIMM_PREFIX)


def is_factory(model: str) -> bool:
    """``package.module:callable``: a model the user's own code builds."""
    return not is_timm(model) and ":" in model


def imagenet_backbone(model: str) -> bool:
    """Backbones that take 3-channel, ImageNet-normalised images of at least 32 pixels."""
    return is_torchvision(model) or is_timm(model)


def check_model_name(model: str) -> str:
    """Raise ``ConfigError`` unless ``model`` is built in, ``timm:NAME`` or ``module:callable``."""
    if model in ALL_MODELS:
        return model
    if is_timm(model):
        if not _TIMM_NAME.fullmatch(model.removeprefix(TIMM_PREFIX)):
            raise ConfigError(f"malformed timm model name {model!r}; write timm:ARCHITECTURE")
        return model
    if ":" in model:
        if not _FACTORY.fullmatch(model) or len(model) > 256:
            raise ConfigError(f"malformed model factory {model!r}; write package.module:callable")
        return model
    raise ConfigError(
        f"unknown model {model!r}; choose one of: {', '.join(ALL_MODELS)}, "
        "timm:ARCHITECTURE, or package.module:callable"
    )
