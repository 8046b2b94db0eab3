"""Activation histograms over fixed bins: the site-side half of federated static-int8 calibration.

Static int8 needs a range per activation tensor. The coordinator has no data, so
the sites measure the fp32 model on their own inputs and send only *counts over
bins the server fixed beforehand*; the server sums them (plainly or under SecAgg+)
and derives ranges (``fedge.edge.export.federated_quantize``). Raw minima and
maxima are never sent: they are single records' values (NVFlare leaves min/max out
of its federated statistics for this reason).

Two passes, so that even the bin edges depend on no single record:

1. ``coarse_spec``: per tensor, a histogram of each *record's* largest magnitude
   ``max|x|`` over fixed log2 bins (2^-24 .. 2^24, four per octave, plus a zero
   bin). The edges depend on nothing; one record adds exactly one count per tensor.
2. ``refine_spec``: from the summed pass-1 counts, each tensor's pass-2 range is
   ``[-M, M]`` with ``M`` the upper edge of the coarse bin holding a high quantile
   (0.99) of the records' maxima: one record moves that quantile by one rank,
   i.e. to a neighbouring occupied bin. Pass 2 counts every activation value in
   2048 linear bins over that range, outliers clamped into the edge bins.

This module runs at sites and on the server: no torch, no flwr. The site side needs
only ONNX Runtime or LiteRT (the device runtimes); choosing the tensors
(``coarse_spec``) needs ``onnx`` or ``ai-edge-quantizer`` and runs on the server.
"""

import json
import math
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedge.shared.errors import DataError, ModelError

__all__ = [
    "BinSpec",
    "TensorBins",
    "coarse_spec",
    "gaussian_noise",
    "l2_sensitivity",
    "model_input_shape",
    "noise_sigma",
    "onnx_with_outputs",
    "refine_spec",
    "site_histograms",
    "split_counts",
    "tflite_signature",
]

FORMATS = ("onnx", "tflite")
Kind = Literal["coarse", "fine"]
# Pass 1: log2 bins of a record's max |x|. 2^-24 is below float16's smallest normal and
# 2^24 beyond any sane activation; four bins per octave make a range at most 19% loose.
COARSE_LO, COARSE_HI, COARSE_PER_OCTAVE = -24, 24, 4
COARSE_BINS = (COARSE_HI - COARSE_LO) * COARSE_PER_OCTAVE + 1  # + the zero bin
# Pass 2: as many bins as ORT's own percentile calibrator uses (``num_bins=2048``).
FINE_BINS = 2048
# Share of records whose maximum the pass-2 range covers; the rest are clamped.
DEFAULT_QUANTILE = 0.99
BATCH = 64  # examples per ONNX Runtime call at a site

# Bounds on a spec from the network (it sizes the site's memory and work).
MAX_TENSORS = 4096
MAX_BINS_PER_TENSOR = 16384
MAX_TOTAL_BINS = 1 << 22  # 32 MiB of int64 counts
MAX_NAME_CHARS = 8192  # litert-torch joins fused ops' module paths with ';'
MAX_ELEMENTS = 1 << 28
MAX_SPEC_BYTES = 4 << 20
MAX_ABS_EDGE = 1e30
# Printable ASCII: litert-torch writes module paths with dots, slashes, semicolons,
# brackets and more; no control characters or non-ASCII reach logs or error messages.
NAME_PATTERN = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True)
class TensorBins:
    """One tensor's bins: ``bins`` over ``[lo, hi]``; ``elements`` values per record.

    For a coarse spec ``lo``/``hi`` are log2 exponents and bin 0 is the zero bin;
    for a fine spec they are the linear range of the values.
    """

    name: str
    lo: float
    hi: float
    bins: int
    elements: int


@dataclass(frozen=True)
class BinSpec:
    """Which tensors to histogram and over which fixed bins; sent by the server to the sites."""

    kind: Kind
    tensors: tuple[TensorBins, ...]

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def total_bins(self) -> int:
        """Length of the flat count vector a site returns."""
        return sum(t.bins for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def to_json(self) -> str:
        """The spec as compact JSON (what crosses the network)."""
        return json.dumps(
            {
                "kind": self.kind,
                "tensors": [[t.name, t.lo, t.hi, t.bins, t.elements] for t in self.tensors],
            },
            separators=(",", ":"),
        )

    @staticmethod
    def from_json(text: str | bytes) -> "BinSpec":
        """Parse and validate a spec from the network.

        Raises
        ------
        DataError
            Malformed JSON, an unknown kind, too many tensors or bins, a bad name,
            or a range that is not finite with ``lo < hi``.
        """
        if len(text) > MAX_SPEC_BYTES:
            raise DataError(f"bin spec is {len(text)} bytes; the limit is {MAX_SPEC_BYTES}")
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            # RecursionError: a spec nested deeper than the parser's stack (a crafted one).
            raise DataError(f"bin spec is not JSON: {str(e)[:200]}") from e
        if not isinstance(data, dict) or set(data) != {"kind", "tensors"}:
            raise DataError("bin spec must be an object with exactly 'kind' and 'tensors'")
        rows = data["tensors"]
        if not isinstance(rows, list) or len(rows) > MAX_TENSORS:
            raise DataError(f"bin spec 'tensors' must be a list of at most {MAX_TENSORS}")
        tensors = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 5):
                raise DataError("each bin spec tensor is [name, lo, hi, bins, elements]")
            name, lo, hi, bins, elements = row
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
                raise DataError(f"bin spec range of {str(name)[:80]!r} is not numeric")
            if not all(type(v) is int for v in (bins, elements)):
                raise DataError(f"bin spec bins/elements of {str(name)[:80]!r} are not integers")
            if not isinstance(name, str):
                raise DataError("bin spec tensor name is not a string")
            try:
                tensors.append(TensorBins(name, float(lo), float(hi), bins, elements))
            except OverflowError as e:  # an integer edge of hundreds of digits
                raise DataError(
                    f"bin spec range of {name[:80]!r} is beyond {MAX_ABS_EDGE:g}"
                ) from e
        kind = data["kind"]
        if kind not in ("coarse", "fine"):
            raise DataError(f"unknown bin spec kind {str(kind)[:40]!r}")
        return BinSpec(kind, tuple(tensors))


def _validate(spec: BinSpec) -> None:
    """Bounds and shapes of a spec; raises ``DataError`` naming the first problem."""
    if spec.kind not in ("coarse", "fine"):
        raise DataError(f"unknown bin spec kind {spec.kind!r}")
    if not 0 < len(spec.tensors) <= MAX_TENSORS:
        raise DataError(f"a bin spec needs 1 to {MAX_TENSORS} tensors, not {len(spec.tensors)}")
    seen: set[str] = set()
    for t in spec.tensors:
        if len(t.name) > MAX_NAME_CHARS:
            raise DataError(f"tensor name of {len(t.name)} characters in bin spec (too long)")
        if not NAME_PATTERN.fullmatch(t.name):
            raise DataError(f"bad tensor name {t.name[:80]!r} in bin spec")
        if t.name in seen:
            raise DataError(f"tensor {t.name[:80]!r} appears twice in the bin spec")
        seen.add(t.name)
        if not (math.isfinite(t.lo) and math.isfinite(t.hi) and t.lo < t.hi):
            raise DataError(f"bin range of {t.name[:80]!r} must be finite with lo < hi")
        if max(abs(t.lo), abs(t.hi)) > MAX_ABS_EDGE:
            raise DataError(f"bin range of {t.name[:80]!r} is beyond {MAX_ABS_EDGE:g}")
        if not 2 <= t.bins <= MAX_BINS_PER_TENSOR:
            raise DataError(f"{t.name[:80]!r} has {t.bins} bins; allowed 2..{MAX_BINS_PER_TENSOR}")
        if not 1 <= t.elements <= MAX_ELEMENTS:
            raise DataError(f"{t.name[:80]!r} has {t.elements} elements per record")
        if spec.kind == "coarse" and (t.lo, t.hi, t.bins) != (COARSE_LO, COARSE_HI, COARSE_BINS):
            raise DataError("a coarse bin spec uses the fixed log2 bins only")
    if spec.total_bins > MAX_TOTAL_BINS:
        raise DataError(f"bin spec has {spec.total_bins} bins in all; limit {MAX_TOTAL_BINS}")


def split_counts(spec: BinSpec, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The flat count vector cut into one array per tensor (views, in spec order).

    Raises
    ------
    DataError
        If ``counts`` is not one-dimensional with ``spec.total_bins`` entries.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or counts.shape[0] != spec.total_bins:
        raise DataError(f"expected {spec.total_bins} counts, got shape {tuple(counts.shape)}")
    out, start = {}, 0
    for t in spec.tensors:
        out[t.name] = counts[start : start + t.bins]
        start += t.bins
    return out


# ---------------------------------------------------------------------- binning


def coarse_upper_edge(index: int) -> float:
    """Upper edge of coarse bin ``index`` (bin 0, the zero bin, ends at 2^COARSE_LO)."""
    return float(2.0 ** (COARSE_LO + index / COARSE_PER_OCTAVE))


def _coarse_counts(values: np.ndarray) -> np.ndarray:
    """Per-record max |x| of a (records, elements) array -> counts over the coarse bins."""
    peak = np.max(np.abs(values.astype(np.float64)), axis=1)
    index = np.zeros(peak.shape, dtype=np.int64)
    positive = peak >= 2.0**COARSE_LO
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        octave = np.floor((np.log2(peak[positive]) - COARSE_LO) * COARSE_PER_OCTAVE)
    index[positive] = np.clip(np.nan_to_num(octave, posinf=COARSE_BINS), 0, COARSE_BINS - 2) + 1
    return np.bincount(index, minlength=COARSE_BINS).astype(np.int64)


def _fine_counts(values: np.ndarray, t: TensorBins) -> np.ndarray:
    """Counts of every value over ``t``'s linear bins; out-of-range values go to the edge bins."""
    # Measured from the middle, so that 0 in a symmetric range lands exactly on a bin edge
    # (from ``lo``, rounding put exact zeros, e.g. after ReLU, one bin low).
    middle = (t.lo + t.hi) / 2
    scaled = (values.astype(np.float64).ravel() - middle) * (t.bins / (t.hi - t.lo)) + t.bins / 2
    index = np.clip(np.floor(scaled), 0, t.bins - 1).astype(np.int64)
    return np.bincount(index, minlength=t.bins).astype(np.int64)


def _per_record(name: str, array: np.ndarray, records: int, elements: int) -> np.ndarray:
    """``array`` as (records, elements); a shape that does not fit is a model/spec mismatch."""
    if array.size != records * elements:
        raise ModelError(
            f"tensor {name[:80]!r} has {array.size} values for {records} records; "
            f"the bin spec says {elements} per record"
        )
    values = array.reshape(records, elements)
    if not np.all(np.isfinite(values)):
        raise DataError(f"the fp32 model produced non-finite values in {name[:80]!r}")
    return values


def site_histograms(model_bytes: bytes, fmt: str, x: np.ndarray, spec: BinSpec) -> np.ndarray:
    """One site's counts: the fp32 model run on its preprocessed inputs ``x``, binned by ``spec``.

    Parameters
    ----------
    model_bytes
        The fp32 model the server sent (for ONNX, the prepared model that
        ``coarse_spec`` saw; see ``federated_quantize.calibration_model``).
    fmt
        ``"onnx"`` or ``"tflite"``.
    x
        The site's preprocessed float32 inputs, (N, ...) as the model takes them.
    spec
        The bins; ``kind`` says which pass.

    Returns
    -------
    np.ndarray
        int64 counts, ``spec.total_bins`` long, tensors in spec order. Coarse: one
        count per record per tensor. Fine: one count per activation value.

    Raises
    ------
    ModelError
        The model lacks a tensor of the spec, or its shapes disagree with it.
    DataError
        No inputs, or non-finite activations.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        raise DataError("a site needs at least one example to compute histograms")
    counts = {t.name: np.zeros(t.bins, dtype=np.int64) for t in spec.tensors}
    for records, outputs in _activations(model_bytes, fmt, x, spec.names):
        for t in spec.tensors:
            values = _per_record(t.name, outputs[t.name], records, t.elements)
            if spec.kind == "coarse":
                counts[t.name] += _coarse_counts(values)
            else:
                counts[t.name] += _fine_counts(values, t)
    return np.concatenate([counts[t.name] for t in spec.tensors])


def refine_spec(
    spec: BinSpec,
    summed: np.ndarray,
    quantile: float = DEFAULT_QUANTILE,
    bins: int = FINE_BINS,
    noise_floor: float = 0.0,
) -> BinSpec:
    """The pass-2 spec: per tensor ``[-M, M]`` from the summed pass-1 counts.

    ``M`` is the upper edge of the coarse bin where the ``quantile`` of the
    records' maxima falls (rounded up to the bin edge). Noisy (DP) sums are
    clipped at zero first, and counts below ``noise_floor`` (e.g. 3 sigma of the
    added noise) are dropped: otherwise the noise in the ~190 empty bins, spread up
    to 2^24, drags the quantile far out.

    Raises
    ------
    DataError
        ``spec`` is not a coarse spec, the counts do not fit it, or a tensor has no counts.
    """
    if spec.kind != "coarse":
        raise DataError("refine_spec needs the coarse (pass 1) spec")
    if not 0.0 < quantile <= 1.0:
        raise DataError(f"quantile must be in (0, 1], not {quantile}")
    fine = []
    for t in spec.tensors:
        c = split_counts(spec, summed)[t.name].astype(np.float64)
        c[c < max(noise_floor, 0.0)] = 0.0
        total = c.sum()
        if total <= 0:
            raise DataError(f"no pass-1 counts for tensor {t.name[:80]!r}")
        index = int(np.searchsorted(np.cumsum(c), quantile * total - 1e-9))
        edge = coarse_upper_edge(min(index, COARSE_BINS - 1))
        fine.append(TensorBins(t.name, -edge, edge, bins, t.elements))
    return BinSpec("fine", tuple(fine))


# --------------------------------------------------------------------------- DP


def l2_sensitivity(spec: BinSpec) -> float:
    """L2 norm by which adding or removing one record can change the summed counts.

    Coarse: one count in one bin per tensor, so ``sqrt(tensors)``. Fine: each
    record adds ``elements`` counts per tensor, at worst all in one bin, so
    ``sqrt(sum(elements**2))``. Replacing a record doubles the L1 change and
    multiplies this by at most ``sqrt(2)``.
    """
    if spec.kind == "coarse":
        return math.sqrt(len(spec.tensors))
    return math.sqrt(sum(float(t.elements) ** 2 for t in spec.tensors))


def noise_sigma(spec: BinSpec, noise_multiplier: float) -> float:
    """Standard deviation of the noise ``gaussian_noise`` adds for ``spec``."""
    return noise_multiplier * l2_sensitivity(spec)


def gaussian_noise(
    summed: np.ndarray, spec: BinSpec, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """The Gaussian mechanism on summed counts: ``N(0, (noise_multiplier * sensitivity)^2)``.

    Applied once by the server to the (SecAgg+) sum, before ranges are derived;
    everything computed from the result is post-processing. The returned counts
    are rounded and clipped at zero (also post-processing). The caller records
    ``noise_multiplier`` and the epsilon its accountant gives for it.
    """
    if noise_multiplier < 0:
        raise DataError("noise_multiplier must be >= 0")
    split_counts(spec, summed)  # checks the length
    counts = np.asarray(summed, dtype=np.float64)
    sigma = noise_sigma(spec, noise_multiplier)
    noisy = counts + rng.normal(0.0, sigma, size=counts.shape)
    return np.clip(np.rint(noisy), 0, None).astype(np.int64)


# ------------------------------------------------------------- running the model


def coarse_spec(model_bytes: bytes, fmt: str) -> BinSpec:
    """Pass 1's spec: the tensors static int8 needs ranges for, with the fixed log2 bins.

    ONNX: the tensors ONNX Runtime's calibrator selects (its
    ``select_tensors_to_calibrate``, as ``quantize_static`` uses) in the given
    model, which should be the prepared model (``quant_pre_process`` output).
    TFLite: the tensors ai-edge-quantizer's ``static_wi8_ai8`` recipe calibrates.
    Per-record element counts come from one run on an all-zero input, so nothing
    here depends on data.

    Raises
    ------
    ModelError
        The model cannot be read or run, or a tensor name is unusable.
    """
    _check_format(fmt)
    pick = _onnx_calibration_tensors if fmt == "onnx" else _tflite_tensors
    names = pick(model_bytes)
    zero = np.zeros((1, *model_input_shape(model_bytes, fmt)), dtype=np.float32)
    sizes: dict[str, int] = {}
    for _, outputs in _activations(model_bytes, fmt, zero, tuple(names)):
        sizes = {n: int(np.asarray(v).size) for n, v in outputs.items()}
    try:
        bins = tuple(
            TensorBins(n, COARSE_LO, COARSE_HI, COARSE_BINS, sizes[n]) for n in sorted(names)
        )
        return BinSpec("coarse", bins)
    except DataError as e:
        raise ModelError(f"cannot make a bin spec for this model: {e}") from e


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ModelError(f"unknown model format {fmt!r}; use one of {FORMATS}")


def _onnx_calibration_tensors(model_bytes: bytes) -> list[str]:
    """The tensors ORT's calibrator would collect for ``quantize_static`` (all op types)."""
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    with tempfile.TemporaryDirectory(prefix="fedge-calib-") as work:
        path = Path(work) / "model.onnx"
        path.write_bytes(model_bytes)
        try:
            calibrater = HistogramCalibrater(path, augmented_model_path=str(Path(work) / "a.onnx"))
            tensors, _ = calibrater.select_tensors_to_calibrate(calibrater.model)
        except Exception as e:  # onnx/ORT raise many types for a bad model
            raise ModelError(f"cannot read the ONNX model: {type(e).__name__}: {e}") from e
    return sorted(tensors)


def _tflite_tensors(model_bytes: bytes) -> list[str]:
    """The tensors ai-edge-quantizer's static recipe calibrates, learnt from one zero input."""
    from ai_edge_quantizer import quantizer, recipe

    shape = model_input_shape(model_bytes, "tflite")
    try:
        engine = quantizer.Quantizer(model_bytes)
        engine.load_quantization_recipe(recipe.static_wi8_ai8())
        signature, input_name = tflite_signature(model_bytes)
        with quiet_preserve_warning():
            zero = np.zeros((1, *shape), np.float32)
            result = engine.calibrate({signature: [{input_name: zero}]})
    except Exception as e:  # the quantizer raises many types
        raise ModelError(f"ai-edge-quantizer cannot calibrate the model: {e}") from e
    return sorted(result)


@contextmanager
def quiet_preserve_warning() -> Iterator[None]:
    """Hide LiteRT's "preserve_all_tensors is for debugging" warning: calibration needs it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        yield


def _tflite_interpreter(model_bytes: bytes, preserve: bool) -> Any:
    """A LiteRT interpreter as ai-edge-quantizer's calibrator makes one (XNNPACK on)."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_preserve_warning():
            interpreter = Interpreter(
                model_content=bytes(model_bytes), experimental_preserve_all_tensors=preserve
            )
        interpreter.allocate_tensors()
    except Exception as e:  # LiteRT raises ValueError/RuntimeError for bad flatbuffers
        raise ModelError(f"LiteRT cannot load the model: {e}") from e
    return interpreter


def tflite_signature(model_bytes: bytes) -> tuple[str, str]:
    """The model's (only) signature key and its input name."""
    signatures = _tflite_interpreter(model_bytes, False).get_signature_list()
    if len(signatures) != 1:
        raise ModelError(f"expected one TFLite signature, found {len(signatures)}")
    key, io = next(iter(signatures.items()))
    if len(io["inputs"]) != 1:
        raise ModelError("expected a TFLite model with one input")
    return key, io["inputs"][0]


def model_input_shape(model_bytes: bytes, fmt: str) -> tuple[int, ...]:
    """One example's input shape (without the batch dimension)."""
    if fmt == "tflite":
        details = _tflite_interpreter(model_bytes, False).get_input_details()
        return tuple(int(d) for d in details[0]["shape"][1:])
    session = _onnx_session(model_bytes)
    dims = session.get_inputs()[0].shape[1:]
    if not all(isinstance(d, int) for d in dims):
        raise ModelError(f"the ONNX input has a non-fixed example shape {dims}")
    return tuple(int(d) for d in dims)


def _onnx_session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As ORT's calibrater: no graph optimisation, so every named tensor stays observable.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for bad models
        raise ModelError(f"ONNX Runtime cannot load the model: {e}") from e


def onnx_with_outputs(model_bytes: bytes, names: tuple[str, ...]) -> bytes:
    """``model_bytes`` with ``names`` added as graph outputs (ORT calibrater's augmentation).

    The server ships models augmented this way, so that a site needs only ONNX Runtime.
    """
    import onnx
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(onnx.load_from_string(model_bytes))
    except Exception as e:  # onnx raises DecodeError and others
        raise ModelError(f"cannot read the ONNX model: {e}") from e
    infos = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    present = {o.name for o in model.graph.output}
    for name in names:
        if name in present:
            continue
        if name not in infos:
            raise ModelError(f"the model has no tensor {name[:80]!r} named in the bin spec")
        model.graph.output.append(infos[name])
    return bytes(model.SerializeToString())


def _activations(
    model_bytes: bytes, fmt: str, x: np.ndarray, names: tuple[str, ...]
) -> Iterator[tuple[int, Mapping[str, np.ndarray]]]:
    """Yield ``(records, {name: values})`` batch by batch for the tensors ``names``."""
    _check_format(fmt)
    if fmt == "onnx":
        session = _onnx_session(model_bytes)
        outputs = {o.name for o in session.get_outputs()}
        if not set(names) <= outputs:
            # A model that does not expose the tensors yet: augment it as ORT's calibrater does.
            session = _onnx_session(onnx_with_outputs(model_bytes, names))
        input_name = session.get_inputs()[0].name
        for start in range(0, len(x), BATCH):
            batch = x[start : start + BATCH]
            try:
                values = session.run(list(names), {input_name: batch})
            except Exception as e:  # ORT's own exception types
                raise ModelError(f"ONNX Runtime failed on the inputs: {e}") from e
            yield len(batch), dict(zip(names, values, strict=True))
        return
    interpreter = _tflite_interpreter(model_bytes, True)
    index = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    missing = [n for n in names if n not in index]
    if missing:
        raise ModelError(f"the model has no tensor {missing[0][:80]!r} named in the bin spec")
    input_index = interpreter.get_input_details()[0]["index"]
    for row in range(len(x)):  # fedge's TFLite models take a batch of one
        try:
            interpreter.set_tensor(input_index, x[row : row + 1])
            interpreter.invoke()
        except Exception as e:  # LiteRT raises ValueError for shape mismatches
            raise ModelError(f"LiteRT failed on the inputs: {e}") from e
        yield 1, {n: interpreter.get_tensor(index[n]) for n in names}
