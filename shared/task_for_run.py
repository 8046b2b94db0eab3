"""Resolve a run config's task into a ``TaskSpec`` (classes, input size, normalisation)."""

import numpy as np

from fedge.shared.config import RunConfig
from fedge.shared.model_names import TORCHVISION_MIN_SIZE, is_torchvision
from fedge.shared.tasks import TabularPreprocessing, TaskSpec, image_task

DEFAULT_USER_IMAGE_SIZE = 64


def task_for_run(cfg: RunConfig) -> TaskSpec:
    """The task of a run. Built-in tabular statistics come from the public split."""
    if cfg.task == "digits":
        size = cfg.image_size or (TORCHVISION_MIN_SIZE if is_torchvision(cfg.model) else 8)
        return image_task("digits", tuple(str(c) for c in range(10)), size, 1, cfg.model)
    if cfg.task == "images":
        size = cfg.image_size or DEFAULT_USER_IMAGE_SIZE
        return image_task("images", cfg.class_list(), max(size, _min_size(cfg.model)), 3, cfg.model)
    if cfg.task == "breast-cancer":
        from fedge.shared.data import breast_cancer_columns, builtin_split_indices, load_builtin

        whole = load_builtin("breast-cancer")
        public = whole.x[builtin_split_indices(len(whole))["public"]]
        return TaskSpec(
            "breast-cancer",
            whole.classes,
            _standardise(breast_cancer_columns(), public),
        )
    # "tabular": the user states the column order; no statistics are known up front.
    columns = cfg.feature_list()
    ones = (1.0,) * len(columns)
    return TaskSpec(
        "tabular", cfg.class_list(), TabularPreprocessing(columns, (0.0,) * len(columns), ones)
    )


def _min_size(model: str) -> int:
    return TORCHVISION_MIN_SIZE if is_torchvision(model) else 8


def _standardise(columns: tuple[str, ...], rows: np.ndarray) -> TabularPreprocessing:
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std[std == 0] = 1.0
    return TabularPreprocessing(
        columns, tuple(float(v) for v in mean), tuple(float(v) for v in std)
    )
