"""Load initial weights from a local file into a model, the pretrain -> fine-tune way.

Accepted: a torch ``state_dict`` (``.pt``/``.pth``/``.bin``, loaded with
``weights_only=True``: no pickled code runs), a ``.safetensors`` file, or a
fedge checkpoint. torchvision's published ``.pth`` files load as they are: when
the file's classifier head has another number of classes than the task, the
backbone is loaded and the task gets a new head. Key prefixes that training wrappers
add (``module.`` from DataParallel, ``model.`` from Lightning-style wrappers) are
stripped when that makes the file fit. Nothing is ever downloaded.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedge.shared.errors import ModelError
from fedge.shared.ml.models import head_keys

log = logging.getLogger(__name__)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_WRAPPER_PREFIXES = ("module.", "model.")


@dataclass(frozen=True)
class InitReport:
    """What ``load_init_weights`` did: whether the file's head was reused."""

    path: str
    loaded_keys: int
    new_head: bool
    unexpected: tuple[str, ...] = ()


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict.

    Raises
    ------
    ModelError
        If the file is missing, corrupt, or holds no tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(
            f"weights file {path} does not exist; fedge never downloads weights, "
            "copy the file onto this machine"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many unrelated types here
        raise ModelError(
            f"cannot read weights file {path}: not a torch state_dict or safetensors file "
            f"({type(e).__name__})"
        ) from e
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise ModelError(f"weights file {path} holds no state_dict")
    tensors = {str(k): v for k, v in state.items()}
    if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ModelError(f"weights file {path} holds values that are not tensors")
    return tensors


def load_init_weights(model: nn.Module, model_name: str, path: Path | str) -> InitReport:
    """Load ``path`` into ``model``; keep a new head if the file's head does not fit.

    Raises
    ------
    ModelError
        If the file's backbone does not match the model (missing keys or shapes).
    """
    own = model.state_dict()
    state = strip_prefixes(read_state_dict(path), set(own))
    heads = head_keys(model, model_name)
    # BatchNorm's integer step counter is bookkeeping, not a weight: files saved before
    # PyTorch 0.4.1 (torchvision's original ResNet .pth files among them) lack it.
    missing = [
        k
        for k in own
        if k not in heads and k not in state and not k.endswith("num_batches_tracked")
    ]
    misshapen = [k for k in own if k not in heads and k in state and state[k].shape != own[k].shape]
    unexpected = [k for k in state if k not in own]
    if missing or misshapen:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys ({_examples(missing)})")
        if misshapen:
            detail.append(f"{len(misshapen)} with other shapes ({_examples(misshapen)})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys ({_examples(unexpected)})")
        raise ModelError(
            f"weights file {path} does not fit model {model_name!r}, backbone not loaded: "
            + ", ".join(detail)
        )
    head_fits = all(k in state and state[k].shape == own[k].shape for k in heads)
    keys = [k for k in own if (head_fits or k not in heads) and k in state]
    model.load_state_dict({k: state[k] for k in keys}, strict=False)
    if unexpected:
        log.warning(
            "weights %s: backbone loaded; %d keys of the file are not in the model (%s)",
            path,
            len(unexpected),
            _examples(unexpected),
        )
    if not head_fits:
        log.info(
            "weights %s: backbone loaded, new %d-class head", path, _out_features(model, own, heads)
        )
    return InitReport(str(path), len(keys), new_head=not head_fits, unexpected=tuple(unexpected))


def strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (``module.``, ``model.``) shared by every key, when the
    stripped names fit the model better than the names as they are."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if len(own & set(stripped)) > len(own & set(state)):
                state = stripped
    return state


def _examples(keys: list[str], count: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:count])
    return f"e.g. {shown}" if len(keys) > count else shown


def _out_features(model: nn.Module, own: dict[str, torch.Tensor], heads: set[str]) -> int:
    weight = [k for k in heads if k.endswith("weight")]
    return int(own[weight[0]].shape[0]) if weight else 0
