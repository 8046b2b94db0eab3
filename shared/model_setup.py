"""Build the model of a run the same way on the server, on every site and at export.

Order matters and is fixed here: build -> make DP-compatible (BatchNorm ->
GroupNorm, under record-level DP) -> load the initial weights -> freeze for the
fine-tuning mode. Server and sites must end with identical frozen backbones.
"""

from torch import nn

from fedge.shared.config import RunConfig
from fedge.shared.models import build_model, freeze_for_mode
from fedge.shared.tasks import TaskSpec
from fedge.shared.weights import load_init_weights


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
        load_init_weights(model, cfg.model, cfg.init_weights)
    freeze_for_mode(model, cfg.model, cfg.mode)
    return model
