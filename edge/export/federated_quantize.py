"""Server side of federated calibration: summed histograms -> ranges -> static int8 artifacts.

The sites send counts over fixed bins (``fedge.shared.activation_histograms``);
this module turns their sum into one range per tensor with ONNX Runtime's own
percentile/entropy code (its ``HistogramCollector``, fed our histograms instead of
data), then quantizes:

- ONNX: static QDQ through ORT's calibration-table path: the ranges become a
  ``TensorsData`` cache file and ``quantize_static`` reads it instead of running a
  calibrator, with the same per-target settings as ``quantize.quantize_onnx_static``;
- TFLite: ai-edge-quantizer's ``static_wi8_ai8`` recipe with the ranges in its
  calibration-result format (``{tensor: {"min": ..., "max": ...}}``).

Both fail closed when a tensor the quantizer needs has no range.
"""

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedge.edge.export.onnx_export import first_line
from fedge.edge.export.quantize import (
    DEFAULT_TARGET,
    STATIC_TARGETS,
    StaticSettings,
    preprocess_for_quantization,
)
from fedge.shared.activation_histograms import (
    BinSpec,
    coarse_spec,
    noise_sigma,
    onnx_with_outputs,
    refine_spec,
    split_counts,
)
from fedge.shared.atomic import atomic_path
from fedge.shared.errors import DataError, ExportError

log = logging.getLogger(__name__)

RangeMethod = Literal["percentile", "entropy", "minmax"]
Ranges = dict[str, tuple[float, float]]
# ``(model_bytes, fmt, spec) -> summed counts``: one pass at every site, summed (a Flower
# round with plain sum or SecAgg+, DP noise added by it if the run asks for noise).
SumAtSites = Callable[[bytes, str, BinSpec], np.ndarray]
# ORT's defaults in ``create_calibrator``: percentile 99.999 on |x| (symmetric),
# entropy over 128 signed bins with 128 quantized bins.
PERCENTILE = 99.999
ENTROPY_BINS = 128


def calibration_model(fp32_onnx: Path | str) -> bytes:
    """The ONNX bytes to ship to the sites: ``fp32_onnx`` prepared as quantization prepares it.

    ``quantize_onnx_static_from_ranges`` runs the same ``quant_pre_process``, so
    the tensor names the sites measure are the ones the quantizer looks up.
    """
    with tempfile.TemporaryDirectory(prefix="fedge-calib-") as work:
        return preprocess_for_quantization(fp32_onnx, Path(work) / "prepared.onnx").read_bytes()


def onnx_coarse_spec(fp32_onnx: Path | str) -> tuple[bytes, BinSpec]:
    """``(model bytes for the sites, pass-1 spec)`` for an fp32 ONNX file.

    The bytes are the prepared model with the spec's tensors added as outputs, so a
    site runs them with ONNX Runtime alone (no ``onnx`` package).
    """
    model = calibration_model(fp32_onnx)
    spec = coarse_spec(model, "onnx")
    return onnx_with_outputs(model, spec.names), spec


def _occupied_range(t_lo: float, t_hi: float, counts: np.ndarray) -> tuple[float, float]:
    """Lower edge of the first, upper edge of the last non-empty bin: the histogram's min/max."""
    nonzero = np.flatnonzero(counts > 0)
    width = (t_hi - t_lo) / len(counts)
    return t_lo + nonzero[0] * width, t_lo + (nonzero[-1] + 1) * width


def ranges_from_histograms(
    spec: BinSpec, summed: np.ndarray, method: str = "percentile", noise_floor: float = 0.0
) -> Ranges:
    """One ``(rmin, rmax)`` per tensor from the summed pass-2 (fine) histograms.

    Parameters
    ----------
    spec
        The fine spec the sites binned with (``refine_spec``'s output).
    summed
        The sum of the sites' count vectors (DP noise, if any, already added).
    method
        ``percentile`` (ORT's default for fedge: 99.999th percentile of |x|),
        ``entropy`` (ORT's KL-divergence threshold) or ``minmax`` (the occupied
        bins' edges). Percentile and entropy run ORT's ``HistogramCollector`` on
        the histograms; its clamp to the observed min/max uses the occupied bins.
    noise_floor
        With DP noise on ``summed``: counts below it are dropped (e.g. 3 sigma), and
        a tensor left with none gets its whole pass-2 range ``[lo, hi]`` (the
        pass-1 bound), instead of ranges drawn from noise.

    Returns
    -------
    dict
        Tensor name -> ``(rmin, rmax)`` as floats.

    Raises
    ------
    DataError
        Not a fine spec, counts that do not fit it, or a tensor with no counts.
    """
    if spec.kind != "fine":
        raise DataError("ranges come from the fine (pass 2) histograms")
    if method not in ("percentile", "entropy", "minmax"):
        raise DataError(f"unknown range method {method!r}; use percentile, entropy or minmax")
    per_tensor = split_counts(spec, summed)
    histograms: dict[str, tuple[Any, ...]] = {}
    ranges: Ranges = {}
    for t in spec.tensors:
        counts = np.clip(per_tensor[t.name], 0, None).astype(np.int64)
        if noise_floor > 0:
            counts[counts < noise_floor] = 0
            if counts.sum() == 0:
                log.info("%s: all pass-2 counts under the noise floor", t.name)
                ranges[t.name] = (t.lo, t.hi)
                continue
        if counts.sum() == 0:
            raise DataError(f"no pass-2 counts for tensor {t.name[:80]!r}")
        low, high = _occupied_range(t.lo, t.hi, counts)
        if method == "minmax":
            ranges[t.name] = (float(min(low, 0.0)), float(max(high, 0.0)))
            continue
        histograms[t.name] = _ort_histogram(t.lo, t.hi, counts, method, low, high)
    if histograms:
        for name, result in _ort_thresholds(histograms, method).items():
            ranges[name] = (float(result[0]), float(result[1]))
    return {t.name: ranges[t.name] for t in spec.tensors}


def _ort_histogram(
    lo: float, hi: float, counts: np.ndarray, method: str, low: float, high: float
) -> tuple[Any, ...]:
    """Our symmetric histogram in the tuple layout ORT's ``HistogramCollector`` keeps.

    Percentile (symmetric): |x| over ``[0, hi]``, the two halves folded together.
    Entropy: signed over ``[-hi, hi]`` in ``ENTROPY_BINS`` bins (merged, edges align).
    """
    f32 = np.float32
    if abs(lo + hi) > 1e-12 * hi or len(counts) % 2:
        raise DataError("fine bins must be symmetric around zero with an even count")
    half = len(counts) // 2
    if method == "percentile":
        folded = counts[half:] + counts[:half][::-1]
        edges = np.linspace(0.0, hi, half + 1).astype(f32)
        return (folded, edges, f32(low), f32(high))
    if len(counts) % ENTROPY_BINS:
        raise DataError(f"entropy needs a multiple of {ENTROPY_BINS} fine bins")
    merged = counts.reshape(ENTROPY_BINS, -1).sum(axis=1)
    edges = np.linspace(-hi, hi, ENTROPY_BINS + 1).astype(f32)
    return (merged, edges, f32(low), f32(high), f32(hi))


def _ort_thresholds(histograms: dict[str, tuple[Any, ...]], method: str) -> dict[str, Any]:
    """ORT's percentile/entropy thresholds for ready-made histograms (its prints kept quiet)."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    collector = HistogramCollector(
        method=method,
        symmetric=method == "percentile",
        num_bins=len(next(iter(histograms.values()))[0]),  # only printed by ORT
        num_quantized_bins=ENTROPY_BINS,
        percentile=PERCENTILE,
        scenario="same",
    )
    collector.histogram_dict = histograms
    with contextlib.redirect_stdout(io.StringIO()):
        result: dict[str, Any] = collector.compute_collection_result()
    return result


def federated_ranges(
    model: bytes,
    fmt: str,
    spec: BinSpec,
    sum_at_sites: SumAtSites,
    method: str = "percentile",
    noise_multiplier: float = 0.0,
) -> Ranges:
    """Both passes through ``sum_at_sites``, then ``ranges_from_histograms``.

    ``spec`` is ``coarse_spec(model, fmt)``; ``model`` is what the sites run
    (for ONNX, ``onnx_coarse_spec``'s bytes). ``noise_multiplier`` says how much
    DP noise ``sum_at_sites`` added (``gaussian_noise``): counts under 3 sigma
    are then treated as empty.
    """
    floor = 3 * noise_sigma(spec, noise_multiplier)
    fine = refine_spec(spec, sum_at_sites(model, fmt, spec), noise_floor=floor)
    floor = 3 * noise_sigma(fine, noise_multiplier)
    return ranges_from_histograms(fine, sum_at_sites(model, fmt, fine), method, floor)


def federated_static_quantizer(
    fmt: str,
    sum_at_sites: SumAtSites,
    *,
    target: str | StaticSettings = DEFAULT_TARGET,
    method: str = "percentile",
) -> Callable[[Path, Path], Path]:
    """``(fp32, out) -> out`` for the export pipeline: calibrate through the sites, quantize.

    Pass it as ``pipeline.export(static_quantizer=...)`` (``fmt="onnx"``) or
    ``static_tflite_quantizer=...`` (``fmt="tflite"``); ``target`` applies to ONNX.
    """
    if fmt not in ("onnx", "tflite"):
        raise ExportError(f"unknown format {fmt!r} for federated calibration")

    def quantize(fp32: Path, out: Path) -> Path:
        if fmt == "onnx":
            model, spec = onnx_coarse_spec(fp32)
            ranges = federated_ranges(model, fmt, spec, sum_at_sites, method)
            return quantize_onnx_static_from_ranges(fp32, out, ranges, target=target)
        model = Path(fp32).read_bytes()
        ranges = federated_ranges(model, fmt, coarse_spec(model, fmt), sum_at_sites, method)
        return quantize_tflite_static_from_ranges(fp32, out, ranges)

    return quantize


# ------------------------------------------------------------------------ ONNX


def quantize_onnx_static_from_ranges(
    fp32_onnx: Path,
    out: Path,
    ranges: Mapping[str, tuple[float, float]],
    *,
    target: str | StaticSettings = DEFAULT_TARGET,
) -> Path:
    """Static QDQ int8 of ``fp32_onnx`` with the activation ranges given, no calibration data.

    The ranges go through ORT's calibration-table path (a ``TensorsData`` cache
    read by ``quantize_static``); weights are quantized from the model as usual.

    Parameters
    ----------
    fp32_onnx
        The fp32 model (prepared here with ``quant_pre_process``, as the sites' copy was).
    out
        Where to write the int8 model (atomically).
    ranges
        Tensor name -> ``(rmin, rmax)``, e.g. ``ranges_from_histograms``'s output.
    target
        The CPU the artifact is for (``quantize.STATIC_TARGETS``), as for central calibration.

    Raises
    ------
    ExportError
        A tensor the quantizer needs has no range, a range is not finite, or ORT fails.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    settings = _settings(target)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="fedge-quant-") as work:
        prepared = preprocess_for_quantization(fp32_onnx, Path(work) / "prepared.onnx")
        needed = {t.name for t in coarse_spec(prepared.read_bytes(), "onnx").tensors}
        _check_ranges(needed, ranges, Path(fp32_onnx).name)
        table = TensorsData(
            CalibrationMethod.MinMax,
            {
                name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                for name, (lo, hi) in ranges.items()
                if name in needed
            },
        )
        cache = Path(work) / "ranges.json"
        save_tensors_data(table, cache)
        types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
        extra = {}
        if settings.op_types is not None:
            extra["op_types_to_quantize"] = list(settings.op_types)
        try:
            with atomic_path(out) as tmp, contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    prepared, tmp, None,
                    quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                    activation_type=types[settings.activations],
                    weight_type=types[settings.weights], reduce_range=settings.reduce_range,
                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=cache,
                    **extra,
                )  # fmt: skip
        except Exception as e:  # ORT raises many types here
            raise ExportError(
                f"static int8 from federated ranges failed for {Path(fp32_onnx).name}: "
                f"{first_line(e)}"
            ) from e
    log.info("static int8 from %d federated ranges: %s -> %s", len(needed), fp32_onnx, out)
    return out


def _settings(target: str | StaticSettings) -> StaticSettings:
    if isinstance(target, StaticSettings):
        return target
    if target not in STATIC_TARGETS:
        raise ExportError(f"unknown target {target!r}; use one of {sorted(STATIC_TARGETS)}")
    return STATIC_TARGETS[target]


def _check_ranges(needed: set[str], ranges: Mapping[str, tuple[float, float]], model: str) -> None:
    """Every needed tensor has a finite ``lo <= hi`` range; raise naming what is wrong."""
    missing = sorted(needed - set(ranges))
    if missing:
        raise ExportError(
            f"no range for {len(missing)} tensor(s) of {model} that static int8 needs, "
            f"e.g. {missing[0][:80]!r}",
            hint="calibrate with the bin spec made from this very model",
        )
    bad = [n for n in needed if not (np.isfinite(ranges[n]).all() and ranges[n][0] <= ranges[n][1])]
    if bad:
        raise ExportError(f"range of {bad[0][:80]!r} is not finite with rmin <= rmax")


# ---------------------------------------------------------------------- TFLite


def quantize_tflite_static_from_ranges(
    fp32_tflite: Path, out: Path, ranges: Mapping[str, tuple[float, float]]
) -> Path:
    """Static int8 (``static_wi8_ai8``) of an fp32 ``.tflite`` with the activation ranges given.

    The calibration result's layout (which tensors, each min/max array's shape)
    is taken from ai-edge-quantizer itself, by calibrating once on an all-zero
    input; every activation's min/max is then replaced by its federated range,
    so no site value is needed and none of the zero run's values survive. The
    model's input and output become int8 (the device runtime scales them).

    Raises
    ------
    ExportError
        A tensor the recipe needs has no range, or ai-edge-quantizer fails.
    """
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as e:
        raise ExportError(
            f"ai-edge-quantizer is not installed ({e})", hint='pip install "fedge[server]"'
        ) from e
    from fedge.edge.export.tflite_export import _quiet_litert
    from fedge.shared.activation_histograms import (
        model_input_shape,
        quiet_preserve_warning,
        tflite_signature,
    )

    out = Path(out)
    model = Path(fp32_tflite).read_bytes()
    try:
        with _quiet_litert(), quiet_preserve_warning():
            engine = quantizer.Quantizer(model)
            engine.load_quantization_recipe(recipe.static_wi8_ai8())
            signature, input_name = tflite_signature(model)
            zero = np.zeros((1, *model_input_shape(model, "tflite")), np.float32)
            layout = engine.calibrate({signature: [{input_name: zero}]})
            _check_ranges(set(layout), ranges, Path(fp32_tflite).name)
            result = {
                name: {key: np.full(np.shape(qsv[key]), ranges[name][i], np.float32)
                       for i, key in enumerate(("min", "max"))}
                for name, qsv in layout.items()
            }  # fmt: skip
            quantized = engine.quantize(
                calibration_result=result, enable_progress_bar=False, enable_progress_report=False
            )
        if quantized.quantized_model is None:
            raise ExportError("ai-edge-quantizer returned no model")
        with atomic_path(out) as tmp:
            tmp.write_bytes(bytes(quantized.quantized_model))
    except ExportError:
        raise
    except Exception as e:  # the quantizer raises many types
        raise ExportError(f"ai-edge-quantizer cannot quantize the model: {first_line(e)}") from e
    log.info("static int8 TFLite from %d federated ranges: %s -> %s", len(layout), fp32_tflite, out)
    return out
