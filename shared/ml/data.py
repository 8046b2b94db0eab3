"""Load a site's data: the built-in scikit-learn sets, an image folder or a CSV.

A data *spec* is the string a site gives ``fedge client start --data``:

- ``digits`` / ``breast-cancer``: a built-in set (its federated ``train`` pool);
- ``digits:test`` (or ``:public``, ``:train``): one fixed split of a built-in set;
- ``digits#2/3``: partition 2 of 3 of the train pool, non-IID (Dirichlet, see
  ``fedge.shared.ml.partition``); ``digits#2/3?alpha=0.3`` sets the concentration,
  ``digits#2/3?alpha=0.3&seed=7`` also the seed of the draw (default 42; every site of
  a federation must give the same alpha and seed, or their partitions overlap);
- ``/path/to/folder``: an image folder with one subfolder per class;
- ``/path/to/file.csv``: a CSV with a label column (``label`` unless the task says).

Everything is returned as raw numpy (uint8 images, float rows) and labels are
mapped onto the task's class list; a label the task does not know is an error.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.shared.config import RunConfig
from fedge.shared.errors import DataError
from fedge.shared.ml.partition import PARTITION_SEED
from fedge.shared.model_names import TORCHVISION_MIN_SIZE, imagenet_backbone
from fedge.shared.tasks import BUILTIN_TASKS, TabularPreprocessing, TaskSpec, image_task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("public", "test", "train")
# Fractions of a built-in set: a small public split (central pretraining), a held-out
# test split (server-side evaluation, export validation), the rest for the federation.
SPLIT_FRACTIONS = {"public": 0.15, "test": 0.20}
SPLIT_SEED = 0


@dataclass(frozen=True)
class RawData:
    """Examples before preprocessing: ``x`` uint8 NHWC images or float rows."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec (see the module docstring)."""

    source: str
    split: str = "train"
    partition: int | None = None
    num_partitions: int | None = None
    alpha: float = 0.5
    seed: int = PARTITION_SEED

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_TASKS

    @staticmethod
    def parse(text: str) -> "DataSpec":
        text = text.strip()
        if not text:
            raise DataError("empty data spec")
        base, _, query = text.partition("?")
        base, _, part = base.partition("#")
        alpha, seed = 0.5, PARTITION_SEED
        for option in query.split("&") if query else []:
            key, _, value = option.partition("=")
            if key == "alpha":
                alpha = _positive_float(value, text)
            elif key == "seed":
                seed = _seed(value, text)
            else:
                raise DataError(
                    f"unknown data option {key!r} in {text!r}; only 'alpha' and 'seed' exist"
                )
        source, split = base, "train"
        if base.split(":")[0] in BUILTIN_TASKS and ":" in base:
            source, split = base.split(":", 1)
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r} in {text!r}; use one of {SPLITS}")
        partition = num = None
        if part:
            try:
                p, n = (int(v) for v in part.split("/"))
            except ValueError as e:
                raise DataError(f"bad partition {part!r} in {text!r}; write '#I/N'") from e
            if not 0 <= p < n:
                raise DataError(f"partition index {p} is not in 0..{n - 1} in {text!r}")
            partition, num = p, n
        return DataSpec(source, split, partition, num, alpha, seed)


def _positive_float(value: str, text: str) -> float:
    try:
        number = float(value)
    except ValueError as e:
        raise DataError(f"bad number {value!r} in {text!r}") from e
    if number <= 0:
        raise DataError(f"alpha must be positive in {text!r}")
    return number


def _seed(value: str, text: str) -> int:
    try:
        seed = int(value)
    except ValueError as e:
        raise DataError(f"bad seed {value!r} in {text!r}; write a whole number") from e
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise DataError(f"seed must be in [0, 2**32) in {text!r}")
    return seed


def builtin_split_indices(n: int) -> dict[str, np.ndarray]:
    """Fixed public/test/train index sets of a built-in set of ``n`` examples."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_public = int(n * SPLIT_FRACTIONS["public"])
    n_test = int(n * SPLIT_FRACTIONS["test"])
    return {
        "public": np.sort(order[:n_public]),
        "test": np.sort(order[n_public : n_public + n_test]),
        "train": np.sort(order[n_public + n_test :]),
    }


def load_builtin(name: str) -> RawData:
    """A built-in scikit-learn set, whole. Shipped with scikit-learn: no download."""
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        # 8x8 pixels with values 0..16 -> uint8 grayscale images.
        images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, :, :, None]
        return RawData(images, bunch.target.astype(np.int64), tuple(str(c) for c in range(10)))
    if name == "breast-cancer":
        bunch = datasets.load_breast_cancer()
        return RawData(
            bunch.data.astype(np.float64),
            bunch.target.astype(np.int64),
            tuple(str(c) for c in bunch.target_names),
        )
    raise DataError(f"unknown built-in data set {name!r}; choose one of {BUILTIN_TASKS}")


def breast_cancer_columns() -> tuple[str, ...]:
    from sklearn import datasets

    return tuple(str(c) for c in datasets.load_breast_cancer().feature_names)


def _subset(data: RawData, index: np.ndarray) -> RawData:
    return RawData(data.x[index], data.y[index], data.classes)


def load_images(folder: Path) -> RawData:
    """An image folder: one subfolder per class, images inside."""
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{folder} has no class subfolders; put each class's images in its own")
    images: list[np.ndarray] = []
    labels: list[str] = []
    for class_dir in class_dirs:
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as img:
                    images.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                # DecompressionBombError: PIL's own bound on pixels; it is no OSError.
                raise DataError(f"cannot read image {path}: {e}") from e
            labels.append(class_dir.name)
    if not images:
        raise DataError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # Images may differ in size: keep them as an object array; preprocessing resizes.
    x = np.empty(len(images), dtype=object)
    x[:] = images
    names = tuple(sorted(set(labels)))
    return RawData(x, np.asarray([names.index(lab) for lab in labels]), names)


def load_csv(path: Path, columns: tuple[str, ...] | None, label_column: str) -> RawData:
    """A CSV with a header, a label column and numeric feature columns."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {path}: {e}") from e
    if not rows:
        raise DataError(f"{path} has no rows")
    header = tuple(k for k in rows[0] if k is not None)
    for line, row in enumerate(rows, start=2):
        # DictReader files a short row's missing cells as None, a long row's extra ones under
        # the key None: either means the row does not match the header.
        if None in row or None in row.values():
            raise DataError(f"{path} line {line} does not have the header's {len(header)} cells")
    if label_column not in header:
        raise DataError(f"{path} has no label column {label_column!r} (columns: {header})")
    features = columns or tuple(c for c in header if c != label_column)
    missing = [c for c in features if c not in header]
    if missing:
        raise DataError(f"{path} lacks the task's feature columns {missing}")
    try:
        x = np.asarray([[float(r[c]) for c in features] for r in rows], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path} has a non-numeric feature value: {e}") from e
    if not np.isfinite(x).all():
        line = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0]) + 2
        raise DataError(f"{path} line {line} has a missing or infinite feature value (nan/inf)")
    labels = [r[label_column] for r in rows]
    names = tuple(sorted(set(labels)))
    return RawData(x, np.asarray([names.index(lab) for lab in labels]), names)


def align_labels(data: RawData, task: TaskSpec, source: str) -> RawData:
    """Map ``data``'s labels onto the task's class order; unknown labels are an error."""
    unknown = sorted(set(data.classes) - set(task.classes))
    if unknown:
        raise DataError(
            f"labels {unknown} in {source} are not among the run's classes {list(task.classes)}"
        )
    mapping = np.asarray([task.classes.index(c) for c in data.classes], dtype=np.int64)
    return RawData(data.x, mapping[data.y], task.classes)


def load_data(spec: DataSpec | str, task: TaskSpec, label_column: str = "label") -> RawData:
    """Load the data a spec names, with labels in the task's class order.

    Raises
    ------
    DataError
        If the data is missing, unreadable, or has labels the task does not know.
    """
    if isinstance(spec, str):
        spec = DataSpec.parse(spec)
    if spec.is_builtin:
        if spec.source != task.name:
            raise DataError(f"data {spec.source!r} does not match the run's task {task.name!r}")
        whole = load_builtin(spec.source)
        data = _subset(whole, builtin_split_indices(len(whole))[spec.split])
    else:
        path = Path(spec.source).expanduser()
        if not path.exists():
            raise DataError(f"data path {path} does not exist")
        if path.is_dir():
            data = load_images(path)
        elif path.suffix.lower() == ".csv":
            columns = (
                task.preprocessing.columns
                if isinstance(task.preprocessing, TabularPreprocessing)
                else None
            )
            data = load_csv(path, columns, label_column)
        else:
            raise DataError(f"{path} is neither a folder of images nor a .csv file")
        if (task.kind == "image") != path.is_dir():
            raise DataError(f"data {path} does not fit the run's {task.kind} task {task.name!r}")
    data = align_labels(data, task, spec.source)
    if spec.partition is not None and spec.num_partitions is not None:
        from fedge.shared.ml.partition import dirichlet_partition

        try:
            parts = dirichlet_partition(data.y, spec.num_partitions, spec.alpha, spec.seed)
        except ValueError as e:  # flwr-datasets: too few examples for this many partitions
            raise DataError(
                f"cannot split the {len(data)} examples of {spec.source!r} into "
                f"{spec.num_partitions} partitions (alpha {spec.alpha:g}): {e}; "
                "use fewer partitions or a larger alpha"
            ) from e
        index = parts[spec.partition]
        data = _subset(data, index)
    if len(data) == 0:
        raise DataError(f"data {spec.source!r} is empty after partitioning")
    return data


DEFAULT_USER_IMAGE_SIZE = 64


def task_for_run(cfg: RunConfig) -> TaskSpec:
    """The task of a run. Built-in tabular statistics come from the public split."""
    if cfg.task == "digits":
        size = cfg.image_size or (TORCHVISION_MIN_SIZE if imagenet_backbone(cfg.model) else 8)
        return image_task("digits", tuple(str(c) for c in range(10)), size, 1, cfg.model)
    if cfg.task == "images":
        size = cfg.image_size or DEFAULT_USER_IMAGE_SIZE
        return image_task("images", cfg.class_list(), max(size, _min_size(cfg.model)), 3, cfg.model)
    if cfg.task == "breast-cancer":
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
    return TORCHVISION_MIN_SIZE if imagenet_backbone(model) else 8


def _standardise(columns: tuple[str, ...], rows: np.ndarray) -> TabularPreprocessing:
    mean = rows.mean(axis=0)
    std = rows.std(axis=0)
    std[std == 0] = 1.0
    return TabularPreprocessing(
        columns, tuple(float(v) for v in mean), tuple(float(v) for v in std)
    )
