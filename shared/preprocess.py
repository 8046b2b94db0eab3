"""Turn raw examples into model inputs, with numpy and Pillow only.

Training, evaluation, export calibration and the edge runtime all call these
functions, so a device preprocesses exactly as the federation trained.
"""

from collections.abc import Sequence

import numpy as np

from fedge.shared.errors import DataError
from fedge.shared.tasks import ImagePreprocessing, Preprocessing, TabularPreprocessing


def _resize(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    pil = Image.fromarray(image)
    pil = pil.convert(mode)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(pil, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def prepare_images(
    images: Sequence[np.ndarray] | np.ndarray, spec: ImagePreprocessing
) -> np.ndarray:
    """uint8 HxW or HxWxC images -> float32 (N, C, H, W), normalised."""
    mode = "L" if spec.channels == 1 else "RGB"
    batch = np.stack([_resize(np.asarray(img, dtype=np.uint8), spec.size, mode) for img in images])
    x = batch.astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def prepare_tabular(rows: np.ndarray, spec: TabularPreprocessing) -> np.ndarray:
    """float (N, F) rows in ``spec.columns`` order -> standardised float32."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != len(spec.columns):
        raise DataError(
            f"expected rows with {len(spec.columns)} columns, got shape {tuple(rows.shape)}"
        )
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray((rows - mean) / std, dtype=np.float32)


def prepare(raw: Sequence[np.ndarray] | np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Dispatch on the preprocessing kind."""
    if isinstance(spec, ImagePreprocessing):
        return prepare_images(raw, spec)
    return prepare_tabular(np.asarray(raw), spec)
