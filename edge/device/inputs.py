"""Read user inputs for ``fedge edge predict``: image files, a CSV, or ``.npy`` arrays.

Everything is turned into the model's preprocessed input with
``fedge.shared.preprocess.prepare``, so a file predicts on a device exactly as
the same example was evaluated in training. Unsupported or mismatched files
raise a ``DataError`` that names the file and says what would work.
"""

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.shared.errors import DataError
from fedge.shared.preprocess import prepare
from fedge.shared.tasks import ImagePreprocessing, TabularPreprocessing, TaskSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TABLE_SUFFIXES = frozenset({".csv"})
ARRAY_SUFFIXES = frozenset({".npy"})
SUPPORTED = IMAGE_SUFFIXES | TABLE_SUFFIXES | ARRAY_SUFFIXES


@dataclass(frozen=True)
class InputBatch:
    """Preprocessed model inputs and a display name per input (``file`` or ``file:row``)."""

    names: list[str]
    x: np.ndarray


def decode_image(data: bytes, channels: int, name: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 HxW (1 channel) or HxWx3."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except UnidentifiedImageError as e:  # its message names the BytesIO object, not the file
        raise DataError(f"{name} is not a readable image: unknown image format") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError (Pillow's pixel bound) is no OSError: it was a traceback.
        raise DataError(f"{name} is not a readable image: {e}") from e


def read_image(path: Path, channels: int) -> np.ndarray:
    """An image file as uint8 HxW (1 channel) or HxWx3."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    return decode_image(data, channels, str(path))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_csv(path: Path, columns: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Rows of ``columns`` (by header name, any order, extra columns ignored) as float32.

    Returns the rows (N, F) and a name per row (``file.csv:LINE``).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path} as UTF-8 text: {e}") from e
    reader = csv.reader(io.StringIO(text))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise DataError(f"{path} is empty")
    if all(_is_number(h) for h in header):
        raise DataError(
            f"{path} has no header row; its first line must name the columns "
            f"({', '.join(columns[:4])}{', ...' if len(columns) > 4 else ''})"
        )
    missing = [c for c in columns if c not in header]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:5])
        raise DataError(f"{path} lacks {len(missing)} column(s) the model needs: {shown}")
    where = [header.index(c) for c in columns]
    rows: list[list[float]] = []
    names: list[str] = []
    for line, record in enumerate(reader, start=2):
        if not any(cell.strip() for cell in record):
            continue
        try:
            rows.append([float(record[i]) for i in where])
        except (ValueError, IndexError) as e:
            raise DataError(f"{path} line {line}: a needed value is missing or not a number") from e
        names.append(f"{path.name}:{line}")
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return np.asarray(rows, dtype=np.float32), names


def _npy_images(name: str, array: np.ndarray, spec: ImagePreprocessing) -> list[np.ndarray]:
    """A uint8 .npy as raw images: HxW, HxWxC, (N,H,W) or (N,H,W,C)."""
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
        return [array]
    if array.ndim in (3, 4):
        return list(array)
    raise DataError(f"{name}: a uint8 array of shape {array.shape} is not an image or images")


def array_inputs(
    array: np.ndarray, task: TaskSpec, preprocessed: bool | None = None, name: str = "array"
) -> np.ndarray:
    """A numeric array (from a ``.npy`` file or request) as preprocessed model inputs.

    ``preprocessed=None`` decides by content: for an image task uint8 arrays are
    raw images and float arrays shaped ``(N, *input_shape)`` are model inputs;
    for a tabular task arrays are raw rows (pass ``True`` for standardised rows).

    Raises
    ------
    DataError
        Booleans or non-numbers, an empty axis, non-finite values, or a shape
        that fits neither raw examples nor model inputs.
    """
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{name} holds {array.dtype} values, not real numbers")
    if array.size == 0 or 0 in array.shape:
        raise DataError(f"{name} has shape {array.shape}: an axis is empty")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise DataError(f"{name} contains non-finite numbers")
    shape = task.input_shape
    if array.shape == shape:
        array = array[None]
    pre = task.preprocessing
    if preprocessed is None:
        preprocessed = isinstance(pre, ImagePreprocessing) and array.dtype != np.uint8
    if preprocessed:
        if array.shape[1:] != shape or not np.issubdtype(array.dtype, np.floating):
            raise DataError(
                f"{name} holds {array.dtype} {array.shape}, but preprocessed inputs must be "
                f"float (N, {', '.join(map(str, shape))})"
                + ("; raw images must be uint8" if isinstance(pre, ImagePreprocessing) else "")
            )
        x = np.ascontiguousarray(array, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{name} has values beyond float32's range")
        return x
    if isinstance(pre, ImagePreprocessing):
        if array.dtype != np.uint8:
            raise DataError(f"{name}: raw images must be uint8, not {array.dtype}")
        return prepare(_npy_images(name, array, pre), pre)
    rows = array[None] if array.ndim == 1 else array
    try:
        return prepare(rows, pre)
    except DataError as e:
        raise DataError(f"{name}: {e}") from e


def read_npy(
    path: Path, task: TaskSpec, preprocessed: bool | None = None
) -> tuple[np.ndarray, list[str]]:
    """A ``.npy`` file as preprocessed inputs (see ``array_inputs``)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable .npy array (object arrays are refused)") from e
    x = array_inputs(array, task, preprocessed, str(path))
    names = [path.name] if len(x) == 1 else [f"{path.name}[{i}]" for i in range(len(x))]
    return x, names


def _expand(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given; a directory stands for its supported files, sorted."""
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file() and p.suffix.lower() in SUPPORTED and not p.name.startswith(".")
            )
            if not found:
                raise DataError(f"directory {item} has no supported input files")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"input {item} does not exist")
    return files


def load_inputs(
    paths: Sequence[Path | str], task: TaskSpec, preprocessed: bool | None = None
) -> InputBatch:
    """Read every input file and preprocess it for ``task``.

    Parameters
    ----------
    paths
        Image files, CSV files (tabular tasks; a header naming the task's columns is
        required), ``.npy`` files, or directories of those.
    task
        The bundle's task (``EdgeModel.task``).
    preprocessed
        For ``.npy`` inputs: force (True) or forbid (False) treating them as already
        preprocessed; ``None`` decides by content (see ``read_npy``).

    Raises
    ------
    DataError
        For unsupported, unreadable or mismatched files.
    """
    pre = task.preprocessing
    kind = "images" if isinstance(pre, ImagePreprocessing) else "tabular rows (CSV)"
    parts: list[np.ndarray] = []
    names: list[str] = []
    for path in _expand(paths):
        suffix = path.suffix.lower()
        if suffix in ARRAY_SUFFIXES:
            x, these = read_npy(path, task, preprocessed)
        elif suffix in IMAGE_SUFFIXES and isinstance(pre, ImagePreprocessing):
            x, these = prepare([read_image(path, pre.channels)], pre), [path.name]
        elif suffix in TABLE_SUFFIXES and isinstance(pre, TabularPreprocessing):
            rows, these = read_csv(path, pre.columns)
            x = prepare(rows, pre)
        elif suffix in SUPPORTED:
            raise DataError(f"{path}: task {task.name!r} takes {kind}, not {suffix} files")
        else:
            raise DataError(
                f"{path}: unsupported input type {suffix or '(none)'}; use "
                f"{'image files' if isinstance(pre, ImagePreprocessing) else 'a CSV'} or .npy"
            )
        parts.append(x)
        names.extend(these)
    if not parts:
        raise DataError("no inputs given")
    return InputBatch(names, np.concatenate(parts))
