"""Global-model checkpoints: safetensors weights plus JSON metadata, written atomically.

A checkpoint holds the *whole* model (frozen backbone included), so it is
enough on its own to resume a run, to evaluate, or to export to the edge. The
metadata records the round, the task (classes and preprocessing), the model
name and the run config. safetensors holds tensors only: loading one runs no code.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedge.shared.atomic import atomic_path
from fedge.shared.errors import ModelError
from fedge.shared.tasks import TaskSpec

FORMAT = "fedge-checkpoint/1"
CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "model.safetensors"
_ROUND_FILE = re.compile(r"round-(\d{4,})\.safetensors")


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: weights and what they are."""

    state_dict: dict[str, torch.Tensor]
    round: int
    model: str
    task: TaskSpec
    config: dict[str, Any]
    metrics: dict[str, Any]
    path: Path


def round_path(run_dir: Path | str, server_round: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"round-{server_round:04d}.safetensors"


def save_checkpoint(
    path: Path | str,
    model_state: dict[str, torch.Tensor],
    server_round: int,
    model_name: str,
    task: TaskSpec,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: a crash leaves the previous file or this one."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    meta = {
        "format": FORMAT,
        "round": server_round,
        "model": model_name,
        "task": task.to_dict(),
        "config": config,
        "metrics": metrics or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fedge": json.dumps(meta, sort_keys=True)})
    return path


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint file.

    Raises
    ------
    ModelError
        If the file is missing, corrupt or not a fedge checkpoint.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("fedge")
            state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        meta = json.loads(raw) if raw else None
    except Exception as e:  # safetensors raises its own and OS errors
        raise ModelError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a fedge checkpoint (no '{FORMAT}' metadata)")
    return Checkpoint(
        state_dict=state,
        round=int(meta["round"]),
        model=str(meta["model"]),
        task=TaskSpec.from_dict(meta["task"]),
        config=dict(meta["config"]),
        metrics=dict(meta.get("metrics", {})),
        path=path,
    )


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The highest-round checkpoint in a run directory, if any."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _ROUND_FILE.fullmatch(p.name))]
    return max(found)[1] if found else None


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint file, or a run directory (its final model, else its latest round)."""
    path = Path(path)
    if path.is_dir():
        final = path / FINAL_MODEL
        if final.is_file():
            return final
        latest = latest_checkpoint(path)
        if latest is None:
            raise ModelError(f"{path} holds no model: neither {FINAL_MODEL} nor checkpoints/")
        return latest
    return path


def load_model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Rebuild the model a checkpoint was taken from and load its weights.

    LoRA adapters are merged into the base weights: the result is a plain model.
    """
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.models import build_run_model, merged

    cfg = RunConfig.from_flower(ckpt.config)
    model = build_run_model(cfg, ckpt.task, load_weights=False)
    try:
        model.load_state_dict(ckpt.state_dict)
    except RuntimeError as e:
        raise ModelError(f"checkpoint {ckpt.path} does not fit model {ckpt.model!r}: {e}") from e
    return merged(model).eval()
