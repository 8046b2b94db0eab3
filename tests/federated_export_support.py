"""Sites with their own image folders, and a run trained on them, for the federated export tests.

scikit-learn's digits become RGB PNG files in one folder per site (a class subfolder per
digit): a user image-folder task (``task = "images"``), which has no built-in data, so the
coordinator holds none.
"""

import json
from pathlib import Path

import numpy as np
import torch

from fedge.shared.config import RunConfig
from fedge.shared.ml.checkpoint import save_checkpoint
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import build_run_model
from fedge.shared.ml.training import make_loader, train

CLASSES = ",".join(str(c) for c in range(10))


def images_config(run_dir: Path, **changes: object) -> RunConfig:
    """The run config of the sites' image-folder task (small CNN on 8x8 RGB images)."""
    values: dict[str, object] = {
        "task": "images", "classes": CLASSES, "image_size": 8, "model": "cnn",
        "min_clients": 3, "num_rounds": 1, "run_dir": str(run_dir), **changes,
    }  # fmt: skip
    return RunConfig.from_mapping(values)


def write_digit_sites(root: Path, sites: int, per_site: int = 150) -> list[Path]:
    """``sites`` folders of digit PNGs (``root/site-i/<label>/<n>.png``), disjoint."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    folders = []
    for s in range(sites):
        folder = root / f"site-{s + 1}"
        for j, index in enumerate(order[s * per_site : (s + 1) * per_site]):
            label = int(digits.target[index])
            pixels = np.clip(digits.images[index] * 16, 0, 255).astype(np.uint8)
            rgb = np.stack([pixels] * 3, axis=-1)
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(folder / str(label) / f"{j}.png")
        folders.append(folder)
    return folders


def site_splits(cfg: RunConfig, folders: list[Path]) -> list[object]:
    """Each site's train/held-out split, as the site computes it."""
    from fedge.client.site import load_site_data

    return [load_site_data(cfg, str(folder), "label") for folder in folders]


def make_images_run(
    run_dir: Path, folders: list[Path], epochs: int = 6, **changes: object
) -> RunConfig:
    """Train the CNN on the union of the sites' train splits; write the run's checkpoint."""
    cfg = images_config(run_dir, **changes)
    task = task_for_run(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, task, load_weights=False)
    splits = site_splits(cfg, folders)
    x = np.concatenate([s.x_train for s in splits])  # type: ignore[attr-defined]
    y = np.concatenate([s.y_train for s in splits])  # type: ignore[attr-defined]
    train(model, make_loader(x, y, 32, True, 0), epochs, 0.05, torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        run_dir / "model.safetensors", model.state_dict(), 1, cfg.model, task, cfg.to_flower()
    )
    summary = {"task": cfg.task, "model": cfg.model, "rounds": 1, "clients": len(folders)}
    (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return cfg
