"""Run directories and keys for the export tests, made without a federation.

A "run" is what the federation server leaves behind: ``model.safetensors`` (a
fedge checkpoint) and ``summary.json``. Here the model is trained centrally for
a few epochs on a built-in data set, which is enough for a meaningful export.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.shared import signing
from fedge.shared.config import RunConfig
from fedge.shared.ml.checkpoint import save_checkpoint
from fedge.shared.ml.data import load_data, task_for_run
from fedge.shared.ml.models import build_run_model
from fedge.shared.ml.training import make_loader, train
from fedge.shared.preprocess import prepare

PRIVACY = {
    "tls": True,
    "supernode_auth": True,
    "secagg": {"enabled": False},
    "dp": {"level": "site", "epsilon": 3.5, "delta": 1e-5, "noise_multiplier": 0.8,
           "clipping_norm": 1.0, "accountant": "rdp"},
}  # fmt: skip


def make_run(
    run_dir: Path,
    epochs: int = 3,
    summary: dict[str, Any] | None = None,
    seed: int = 0,
    **config: Any,
) -> Path:
    """Train ``config``'s model on its task's train split; write a run directory.

    ``epochs=0`` leaves the model at its random initialisation.
    """
    torch.manual_seed(seed)
    cfg = RunConfig.from_mapping({"num_rounds": 2, **config})
    task = task_for_run(cfg)
    model = build_run_model(cfg, task, load_weights=False)
    if epochs:
        data = load_data(task.name, task)
        x = prepare(data.x, task.preprocessing)
        train(model, make_loader(x, data.y, 32, True, seed), epochs, 0.05, torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        run_dir / "model.safetensors", model.state_dict(), 2, cfg.model, task, cfg.to_flower()
    )
    record = {
        "task": cfg.task, "model": cfg.model, "mode": cfg.mode, "strategy": cfg.strategy,
        "rounds": 2, "clients": 2, "initial_accuracy": 0.1, "final_accuracy": 0.9,
    }  # fmt: skip
    record.update(summary or {})
    (run_dir / "summary.json").write_text(json.dumps(record), encoding="utf-8")
    return run_dir


def make_key(folder: Path) -> tuple[Path, Path]:
    """A fresh signing key pair: (private key path, public key path)."""
    private = folder / "signing.key"
    return private, signing.generate_signing_key(private)


def eval_inputs(task_name: str, task: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw examples, preprocessed inputs, labels) of a built-in task's test split."""
    raw = load_data(f"{task_name}:test", task)
    return raw.x, prepare(raw.x, task.preprocessing), raw.y


def run_onnx_file(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of a loose ONNX file (not in a bundle), straight through onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def bundle_logits(bundle_dir: Path, x: np.ndarray) -> dict[str, Any]:
    """Each artifact of a bundle -> (manifest entry, logits on ``x`` by the device runtime)."""
    from fedge.edge.device.runtime import load_artifact
    from fedge.shared.bundle import read_manifest

    manifest = read_manifest(bundle_dir)
    out = {}
    for entry in manifest.artifacts:
        with load_artifact(bundle_dir, manifest, entry) as model:
            out[entry.file] = (entry, model.predict(x).logits)
    return out
