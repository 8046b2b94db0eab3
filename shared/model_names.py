"""Names of the built-in models, importable without torch (for config validation)."""

from fedge.shared.errors import ConfigError

CUSTOM_MODELS = ("cnn", "mlp")
TORCHVISION_MODELS = ("mobilenet_v3_small", "resnet18", "resnet50")
ALL_MODELS = CUSTOM_MODELS + TORCHVISION_MODELS
# Smallest input side a torchvision backbone handles (5 stride-2 stages).
TORCHVISION_MIN_SIZE = 32


def is_torchvision(model: str) -> bool:
    return model in TORCHVISION_MODELS


def check_model_name(model: str) -> str:
    if model not in ALL_MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(ALL_MODELS)}")
    return model
