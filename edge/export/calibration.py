"""Evaluation and calibration data for export, from fedge's own data module.

Export validates artifacts on, and calibrates static quantization with, data
preprocessed by ``fedge.shared.preprocess.prepare``: exactly what training saw
and what the device runtime will feed the model. ``CalibrationReader`` is
ONNX Runtime's ``CalibrationDataReader`` protocol over such data, rewindable
so the same reader can calibrate more than one model.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from fedge.shared.errors import ConfigError, DataError
from fedge.shared.tasks import BUILTIN_TASKS, TaskSpec

INPUT_NAME = "input"
# Enough examples for stable min/max ranges; ORT's calibrator keeps every batch's
# activations in memory, so more only costs memory and time.
DEFAULT_CALIBRATION_EXAMPLES = 256
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class PreparedData:
    """Preprocessed model inputs ``x`` (float32) with labels ``y``, and where they came from."""

    x: np.ndarray
    y: np.ndarray
    spec: str

    def __len__(self) -> int:
        return len(self.y)


def default_data_specs(task: TaskSpec) -> tuple[str | None, str | None]:
    """``(eval_spec, calibration_spec)`` for a task: its test and public splits if built in.

    User tasks (``images``, ``tabular``) have no built-in data: both are ``None``
    and the caller must ask for ``--eval-data`` / ``--calibration``.
    """
    if task.name in BUILTIN_TASKS:
        return f"{task.name}:test", f"{task.name}:public"
    return None, None


def resolve_data_specs(
    task: TaskSpec,
    eval_data: str | None,
    calibration: str | None,
    needs_calibration: bool,
    needs_eval: bool = True,
) -> tuple[str | None, str | None]:
    """Fill in the default data specs, or explain which option a user task needs.

    ``needs_eval`` is false for an export without validation (``--no-validate``):
    then no evaluation spec is required, and ``None`` may come back for it.

    Raises
    ------
    ConfigError
        If the task has no built-in data and a needed spec was not given.
    """
    default_eval, default_calibration = default_data_specs(task)
    eval_spec = eval_data or default_eval
    calibration_spec = calibration or default_calibration
    missing = []
    if needs_eval and eval_spec is None:
        missing.append("--eval-data (labelled data to validate the artifacts on)")
    if needs_calibration and calibration_spec is None:
        missing.append("--calibration (representative inputs for static int8 quantization)")
    if missing:
        raise ConfigError(
            f"task {task.name!r} has no built-in data; pass " + " and ".join(missing),
            hint="a data spec is an image folder or a CSV path, as for `fedge client start --data`",
        )
    return eval_spec if needs_eval else None, calibration_spec if needs_calibration else None


def load_prepared(
    spec: str, task: TaskSpec, limit: int | None = None, label_column: str = "label"
) -> PreparedData:
    """Load a data spec and preprocess it for the model, keeping at most ``limit`` examples.

    The subset, when ``limit`` is set, is a fixed random draw (seeded), so two
    exports of the same model calibrate identically.

    Raises
    ------
    DataError
        If the data is missing, malformed, or does not fit the task.
    """
    from fedge.shared.ml.data import load_data
    from fedge.shared.preprocess import prepare

    raw = load_data(spec, task, label_column=label_column)
    index = np.arange(len(raw))
    if limit is not None and len(raw) > limit:
        index = np.sort(np.random.default_rng(CALIBRATION_SEED).permutation(len(raw))[:limit])
    x = prepare(raw.x[index], task.preprocessing)
    expected = task.input_shape
    if tuple(x.shape[1:]) != expected:
        raise DataError(
            f"data {spec!r} preprocesses to shape {tuple(x.shape[1:])}, the model takes {expected}"
        )
    return PreparedData(np.ascontiguousarray(x, dtype=np.float32), raw.y[index], spec)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive batches of ``x`` (the last may be smaller)."""
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


class CalibrationReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over preprocessed inputs; ``rewind`` starts it over.

    Parameters
    ----------
    x
        Preprocessed float32 inputs, (N, ...) as the model takes them.
    batch_size
        Examples per ``get_next`` call. One by default: ORT's histogram calibrators
        (percentile, entropy) stack the batches and fail on a shorter last batch.
    input_name
        The model's input name (fedge exports always name it ``input``).
    """

    def __init__(self, x: np.ndarray, batch_size: int = 1, input_name: str = INPUT_NAME) -> None:
        if len(x) == 0:
            raise DataError("calibration data is empty; static quantization needs examples")
        if batch_size < 1:
            raise ConfigError("calibration batch size must be at least 1")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.batch_size = batch_size
        self.input_name = input_name
        self._iter: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as ``{input_name: array}``, or ``None`` when the data is used up."""
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        """Start again from the first batch (ORT calls this between calibration passes)."""
        self._iter = batches(self.x, self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    @staticmethod
    def from_spec(
        spec: str,
        task: TaskSpec,
        limit: int = DEFAULT_CALIBRATION_EXAMPLES,
        batch_size: int = 1,
    ) -> "CalibrationReader":
        """A reader over (at most ``limit`` examples of) the data ``spec`` names."""
        return CalibrationReader(load_prepared(spec, task, limit).x, batch_size)
