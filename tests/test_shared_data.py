"""Data specs, built-in splits, Dirichlet partitions, image folders, CSVs and preprocessing."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedge.shared.config import RunConfig
from fedge.shared.errors import DataError
from fedge.shared.ml.data import (
    SPLIT_FRACTIONS,
    DataSpec,
    builtin_split_indices,
    load_builtin,
    load_data,
    task_for_run,
)
from fedge.shared.ml.partition import dirichlet_partition
from fedge.shared.preprocess import prepare
from fedge.shared.tasks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessing,
    TabularPreprocessing,
    TaskSpec,
    image_task,
)

DIGIT_CLASSES = tuple(str(c) for c in range(10))


@pytest.fixture(scope="module")
def digits_task() -> TaskSpec:
    return task_for_run(RunConfig(task="digits", model="cnn"))


def _image_task(classes: tuple[str, ...], size: int = 8, channels: int = 3) -> TaskSpec:
    return image_task("images", classes, size, channels, "cnn")


def _write_image_folder(root: Path, per_class: dict[str, int], size: int = 10) -> Path:
    """One subfolder per class, each with ``n`` small PNGs whose pixels encode the class."""
    for index, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.full((size, size, 3), 40 * index + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# --- DataSpec.parse ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits", DataSpec("digits", "train", None, None, 0.5)),
        ("  digits:test ", DataSpec("digits", "test", None, None, 0.5)),
        ("breast-cancer:public", DataSpec("breast-cancer", "public", None, None, 0.5)),
        ("digits#1/3", DataSpec("digits", "train", 1, 3, 0.5)),
        ("digits#1/3?alpha=0.3", DataSpec("digits", "train", 1, 3, 0.3)),
        ("digits#1/3?seed=7&alpha=0.3", DataSpec("digits", "train", 1, 3, 0.3, 7)),
        ("digits:test#0/2", DataSpec("digits", "test", 0, 2, 0.5)),
        ("/data/site-a", DataSpec("/data/site-a", "train", None, None, 0.5)),
        ("/data/a.csv#2/4", DataSpec("/data/a.csv", "train", 2, 4, 0.5)),
    ],
)
def test_parse_valid_specs(text: str, expected: DataSpec) -> None:
    spec = DataSpec.parse(text)
    assert spec == expected
    assert spec.is_builtin == (expected.source in ("digits", "breast-cancer"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty data spec"),
        ("   ", "empty data spec"),
        ("digits#3/3", "partition index 3 is not in 0..2"),
        ("digits#-1/3", "partition index -1"),
        ("digits#a/3", "bad partition"),
        ("digits#1", "bad partition"),
        ("digits#1/2/3", "bad partition"),
        ("digits:validation", "unknown split 'validation'"),
        ("digits:", "unknown split"),
        ("digits#0/2?beta=1", "unknown data option 'beta'"),
        ("digits#0/2?alpha=x", "bad number"),
        ("digits#0/2?alpha=0", "alpha must be positive"),
        ("digits#0/2?alpha=0.5&seed=1.5", "bad seed"),
        ("digits#0/2?seed=-1", "seed must be in"),
    ],
)
def test_parse_rejects_bad_specs(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        DataSpec.parse(text)


# --- built-in splits -------------------------------------------------------------------------


def test_builtin_splits_are_disjoint_cover_everything_and_fixed() -> None:
    n = len(load_builtin("digits"))
    splits = builtin_split_indices(n)
    sizes = {name: len(index) for name, index in splits.items()}
    assert sizes["public"] == int(n * SPLIT_FRACTIONS["public"])
    assert sizes["test"] == int(n * SPLIT_FRACTIONS["test"])
    assert sum(sizes.values()) == n
    joined = np.concatenate(list(splits.values()))
    assert len(np.unique(joined)) == n  # disjoint ...
    assert set(joined.tolist()) == set(range(n))  # ... and cover every example
    again = builtin_split_indices(n)
    for name in splits:
        np.testing.assert_array_equal(splits[name], again[name])


def test_load_builtin_split_matches_indices(digits_task: TaskSpec) -> None:
    whole = load_builtin("digits")
    test = load_data("digits:test", digits_task)
    index = builtin_split_indices(len(whole))["test"]
    np.testing.assert_array_equal(test.y, whole.y[index])
    np.testing.assert_array_equal(test.x, whole.x[index])
    assert test.x.dtype == np.uint8 and test.x.shape[1:] == (8, 8, 1)
    assert test.x.max() == 255  # 0..16 scaled into the uint8 range
    assert test.classes == DIGIT_CLASSES
    assert len(load_data("digits", digits_task)) == len(whole) - len(test) - len(
        load_data("digits:public", digits_task)
    )


def test_load_data_refuses_another_tasks_builtin(digits_task: TaskSpec) -> None:
    with pytest.raises(DataError, match="'breast-cancer' does not match the run's task 'digits'"):
        load_data("breast-cancer", digits_task)


# --- Dirichlet partitions --------------------------------------------------------------------


@pytest.mark.slow  # imports Hugging Face datasets: seconds on a loaded box
def test_dirichlet_partitions_disjoint_cover_deterministic_non_iid(digits_task: TaskSpec) -> None:
    pool = load_data("digits", digits_task)
    index = dirichlet_partition(pool.y, 3, 0.3)
    joined = np.sort(np.concatenate(index))
    np.testing.assert_array_equal(joined, np.arange(len(pool)))  # disjoint, cover the pool
    assert min(len(i) for i in index) >= 10
    again = dirichlet_partition(pool.y, 3, 0.3)
    for a, b in zip(index, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # The spec loads exactly that partition.
    part = load_data("digits#1/3?alpha=0.3", digits_task)
    np.testing.assert_array_equal(part.y, pool.y[index[1]])
    np.testing.assert_array_equal(part.x, pool.x[index[1]])
    # Another seed draws another split (the benchmark's seeds); the spec passes it through.
    reseeded = dirichlet_partition(pool.y, 3, 0.3, seed=7)
    assert not np.array_equal(reseeded[1], index[1])
    np.testing.assert_array_equal(
        load_data("digits#1/3?alpha=0.3&seed=7", digits_task).y, pool.y[reseeded[1]]
    )

    # Non-IID: label histograms differ a lot between partitions (an IID split would put
    # roughly a third of each class in each partition) ...
    def min_total_variation(parts: list[np.ndarray]) -> float:
        hist = np.stack([np.bincount(pool.y[i], minlength=10) / len(i) for i in parts])
        tv = 0.5 * np.abs(hist[:, None, :] - hist[None, :, :]).sum(-1)
        return float(tv[np.triu_indices(len(parts), 1)].min())

    skewed = min_total_variation(index)
    assert skewed > 0.2
    # ... and a large alpha gives a nearly IID split.
    assert min_total_variation(dirichlet_partition(pool.y, 3, 100.0)) < skewed / 2


def test_small_folder_partitions_and_too_many_partitions(tmp_path: Path) -> None:
    folder = _write_image_folder(tmp_path / "imgs", {"cat": 10, "dog": 10, "owl": 10})
    task = _image_task(("cat", "dog", "owl"))
    # 30 examples in 3 partitions: every partition gets some, together all of them.
    sizes = [len(load_data(f"{folder}#{i}/3", task)) for i in range(3)]
    assert sum(sizes) == 30 and min(sizes) >= 1
    with pytest.raises(DataError, match="cannot split the 30 examples"):
        load_data(f"{folder}#0/40", task)


# --- image folders ---------------------------------------------------------------------------


def test_image_folder_loads_with_task_label_order(tmp_path: Path) -> None:
    folder = _write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 3})
    (folder / "dog" / "notes.txt").write_text("not an image")
    (folder / ".hidden").mkdir()
    task = _image_task(("dog", "bird", "cat"))  # another order, and a class with no images
    data = load_data(str(folder), task)
    assert data.classes == task.classes
    assert len(data) == 5
    assert sorted(data.y.tolist()) == [0, 0, 0, 2, 2]  # dog -> 0, cat -> 2
    for x, y in zip(data.x, data.y, strict=True):
        assert x.shape == (10, 10, 3) and x.dtype == np.uint8
        # cat images were written with pixel values 0..1, dog images 40..42.
        assert (x[0, 0, 0] >= 40) == (task.classes[y] == "dog")


def test_image_folder_label_mismatch_names_the_label(tmp_path: Path) -> None:
    folder = _write_image_folder(tmp_path / "imgs", {"cat": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"labels \['zebra'\]"):
        load_data(str(folder), _image_task(("cat", "dog")))


def test_image_folder_problems(tmp_path: Path) -> None:
    task = _image_task(("cat", "dog"))
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing"), task)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_data(str(tmp_path / "flat"), task)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_data(str(tmp_path / "empty"), task)
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        load_data(str(tmp_path / "broken"), task)


def test_image_past_pils_pixel_bound_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL's DecompressionBombError is no OSError: it escaped as a traceback."""
    folder = _write_image_folder(tmp_path / "imgs", {"cat": 1, "dog": 1})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 10x10 images: past twice the bound
    with pytest.raises(DataError, match=r"cannot read image.*decompression bomb"):
        load_data(str(folder), _image_task(("cat", "dog")))


def test_image_folder_for_tabular_task_is_refused(tmp_path: Path) -> None:
    folder = _write_image_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    task = task_for_run(RunConfig(task="tabular", model="mlp", classes="a,b", features="f1,f2"))
    with pytest.raises(DataError, match="does not fit the run's tabular task"):
        load_data(str(folder), task)


# --- CSV -------------------------------------------------------------------------------------


@pytest.fixture
def tabular_task() -> TaskSpec:
    return task_for_run(RunConfig(task="tabular", model="mlp", classes="no,yes", features="b,a"))


def test_csv_loads_task_columns_in_task_order(tmp_path: Path, tabular_task: TaskSpec) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,extra,outcome,b\n1,9,yes,2.5\n3,9,no,4\n5,9,yes,6\n")
    data = load_data(str(path), tabular_task, label_column="outcome")
    np.testing.assert_allclose(data.x, [[2.5, 1], [4, 3], [6, 5]])  # columns b, a
    assert data.y.tolist() == [1, 0, 1]
    assert data.classes == ("no", "yes")


def test_csv_problems(tmp_path: Path, tabular_task: TaskSpec) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,yes\n")
    with pytest.raises(DataError, match="no label column 'outcome'"):
        load_data(str(path), tabular_task, label_column="outcome")
    path.write_text("a,label\n1,yes\n")
    with pytest.raises(DataError, match=r"lacks the task's feature columns \['b'\]"):
        load_data(str(path), tabular_task)
    path.write_text("a,b,label\n1,two,yes\n")
    with pytest.raises(DataError, match="non-numeric"):
        load_data(str(path), tabular_task)
    path.write_text("a,b,label\n1\n")  # a short row: missing values
    with pytest.raises(DataError, match="line 2 does not have the header's 3 cells"):
        load_data(str(path), tabular_task)
    path.write_text("a,b,label\n1,2,yes\n1,2\n")  # only the label missing: was a TypeError
    with pytest.raises(DataError, match="line 3 does not have the header's 3 cells"):
        load_data(str(path), tabular_task)
    path.write_text("a,b,label\n1,2,yes,9\n")  # a long row
    with pytest.raises(DataError, match="line 2 does not have the header's 3 cells"):
        load_data(str(path), tabular_task)
    for bad in ("nan", "inf", "-Infinity"):  # float() reads them; training would diverge
        path.write_text(f"a,b,label\n1,2,yes\n{bad},2,no\n")
        with pytest.raises(DataError, match="line 3 has a missing or infinite"):
            load_data(str(path), tabular_task)
    path.write_text("a,b,label\n1,2,maybe\n")
    with pytest.raises(DataError, match=r"labels \['maybe'\]"):
        load_data(str(path), tabular_task)
    path.write_text("a,b,label\n")
    with pytest.raises(DataError, match="has no rows"):
        load_data(str(path), tabular_task)
    other = tmp_path / "d.json"
    other.write_text("{}")
    with pytest.raises(DataError, match=r"neither a folder of images nor a \.csv"):
        load_data(str(other), tabular_task)


# --- preprocessing ---------------------------------------------------------------------------


def test_prepare_images_resizes_and_normalises() -> None:
    spec = ImagePreprocessing(size=4, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    white = np.full((9, 7, 3), 255, dtype=np.uint8)
    black = np.zeros((3, 3, 3), dtype=np.uint8)
    x = prepare([white, black], spec)  # sizes differ, as an image folder gives them
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32 and x.flags.c_contiguous
    for c in range(3):
        np.testing.assert_allclose(x[0, c], (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rtol=1e-6)
        np.testing.assert_allclose(x[1, c], -IMAGENET_MEAN[c] / IMAGENET_STD[c], rtol=1e-6)


def test_prepare_images_grayscale_and_rgb() -> None:
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 255
    gray_spec = ImagePreprocessing(size=8, channels=1, mean=(0.0,), std=(1.0,), channel_order="L")
    gray = prepare([red], gray_spec)
    assert gray.shape == (1, 1, 8, 8)
    # Pillow's L conversion: L = 0.299 R + 0.587 G + 0.114 B.
    np.testing.assert_allclose(gray, round(0.299 * 255) / 255, atol=1 / 255)

    # A single-channel HxWx1 image (as digits holds them) into a 3-channel RGB spec.
    one = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 16
    rgb_spec = ImagePreprocessing(size=4, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    rgb = prepare([one], rgb_spec)
    assert rgb.shape == (1, 3, 4, 4)
    expected = (one[:, :, 0].astype(np.float32) / 255 - 0.5) / 0.5
    for c in range(3):
        np.testing.assert_allclose(rgb[0, c], expected, atol=1e-6)


def test_prepare_tabular_standardises_and_checks_columns() -> None:
    spec = TabularPreprocessing(columns=("a", "b"), mean=(1.0, 10.0), std=(2.0, 5.0))
    x = prepare(np.array([[1.0, 10.0], [5.0, 0.0]]), spec)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.0, 0.0], [2.0, -2.0]])
    with pytest.raises(DataError, match="expected rows with 2 columns, got shape"):
        prepare(np.ones((3, 3)), spec)
    with pytest.raises(DataError, match="expected rows with 2 columns"):
        prepare(np.ones(2), spec)


def test_breast_cancer_task_standardises_public_split() -> None:
    task = task_for_run(RunConfig(task="breast-cancer", model="mlp"))
    public = load_data("breast-cancer:public", task)
    x = prepare(public.x, task.preprocessing)
    assert x.shape == (len(public), 30)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-3)
