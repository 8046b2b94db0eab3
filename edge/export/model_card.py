"""What ``model_card.json`` says: where the model came from and what export measured.

The card is for people and audits (its hash is in the signed manifest): the
task, base model and initial weights, fine-tuning mode, rounds, clients and
strategy, the run's metrics from ``summary.json``, the privacy record, the
export settings and tool versions, and the validation table. Local paths are
reduced to their names: a card travels to every device.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fedge.shared.config import RunConfig
from fedge.shared.ml.checkpoint import Checkpoint
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)

FORMAT = "fedge-model-card/1"
SUMMARY_FILE = "summary.json"
# The run-level facts of summary.json worth a card (not site names or server paths).
SUMMARY_KEYS = (
    "pretrained_accuracy", "initial_accuracy", "final_accuracy", "final_loss", "rounds",
    "rounds_configured", "clients", "failures", "stopped", "trainable_fraction",
)  # fmt: skip
TOOLS = ("fedge", "torch", "onnx", "onnxruntime", "litert-torch", "ai-edge-quantizer")


def run_dir_of(source: Path, checkpoint: Path) -> Path:
    """The run directory of a checkpoint (``RUN/model.safetensors``, ``RUN/checkpoints/...``)."""
    if source.is_dir():
        return source
    parent = checkpoint.parent
    return parent.parent if parent.name == "checkpoints" else parent


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``, or ``{}`` when there is none (a bare checkpoint)."""
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def default_version(run_name: str, server_round: int) -> str:
    """``<run>-r<round>-<UTC time>``: says where the model came from, and is unique."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{run_name}-r{server_round:04d}-{stamp}"


def describe_spec(spec: str | None) -> str | None:
    """A data spec for the card: built-in specs as they are, paths by their name only."""
    if spec is None:
        return None
    from fedge.shared.ml.data import DataSpec

    return spec if DataSpec.parse(spec).is_builtin else Path(spec).name


def source_card(
    ckpt: Checkpoint, cfg: RunConfig, run_dir: Path, summary: Mapping[str, Any]
) -> dict[str, Any]:
    """The card's facts about the model's origin: model, training, metrics, source."""
    metrics = {k: summary[k] for k in SUMMARY_KEYS if k in summary}
    metrics["checkpoint"] = dict(ckpt.metrics)
    return {
        "model": {"name": ckpt.model, "init_weights": cfg.init_weights or None, "mode": cfg.mode},
        "training": {
            "strategy": cfg.strategy,
            "rounds": ckpt.round,
            "local_epochs": cfg.local_epochs,
            "clients": summary.get("clients"),
            "dp": cfg.privacy.dp,
            "secagg": cfg.privacy.secagg,
        },
        "metrics": metrics,
        "source": {"run": run_dir.name, "checkpoint": ckpt.path.name, "round": ckpt.round},
    }


def tool_versions() -> dict[str, str]:
    """Installed versions of the tools that made the artifacts."""
    versions = {}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def complete_card(
    card: Mapping[str, Any] | None,
    *,
    version: str,
    task: TaskSpec,
    skipped: Mapping[str, str],
    privacy: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The card export writes: the caller's facts (``source_card``, export settings).

    It says the bundle is not validated (``validated: false``, ``validation: null``)
    until ``validation_card``'s keys replace those.
    """
    complete = dict(card or {})
    complete.update(
        {
            "format": FORMAT,
            "version": version,
            "created_at": _now(),
            "task": task.to_dict(),
            "validated": False,
            "validation": None,
            "validation_data": None,
            "skipped": dict(skipped),
            "failed_validation": [],
            "privacy": None if privacy is None else dict(privacy),
        }
    )
    complete["export"] = {**dict(complete.get("export") or {}), "tools": tool_versions()}
    return complete


def validation_card(
    rows: Sequence[Mapping[str, Any]],
    failed: Sequence[str],
    *,
    eval_spec: str | None,
    eval_examples: int,
    max_accuracy_drop: float,
) -> dict[str, Any]:
    """The card keys validation sets: the table, what failed, and on what data."""
    return {
        "validated": True,
        "validation": [dict(row) for row in rows],
        "failed_validation": list(failed),
        "validation_data": {
            "eval_data": describe_spec(eval_spec),
            "eval_examples": eval_examples,
            "max_accuracy_drop": max_accuracy_drop,
            "runtime": "fedge.edge.device.runtime",
            "validated_at": _now(),
        },
    }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
