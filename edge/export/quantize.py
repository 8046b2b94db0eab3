"""int8 quantization of ONNX models with ONNX Runtime: a path in, a path out.

Two flavours, like ORT's own ``quantize_dynamic`` / ``quantize_static``:

- dynamic: weights stored as int8 (QInt8), activations quantized on the fly at
  run time, per batch. Needs no data. Smallest file, but on CNNs ORT runs it
  through slow ConvInteger kernels: choose it for size, or for MatMul-heavy models.
- static: weights *and* activations 8-bit (uint8 activations, int8 weights) in
  the QDQ format, per-channel (7-bit, ``reduce_range``) weight scales. The
  activation ranges come from calibration data read through a
  ``CalibrationDataReader`` (``fedge.edge.export.calibration.CalibrationReader``).
  The fast one on CPUs with int8 kernels, but only as good as its calibration data.

Both first run ``quant_pre_process`` (shape inference + graph optimisation, which
ORT recommends before quantizing), into a temporary file beside the output.
"""

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from onnxruntime.quantization import CalibrationDataReader

from fedge.shared.atomic import atomic_path
from fedge.shared.errors import ExportError

log = logging.getLogger(__name__)

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True)
class StaticSettings:
    """ORT ``quantize_static`` settings for one kind of target CPU.

    ``activations``/``weights`` are ``"u8"`` or ``"s8"``; ``reduce_range`` stores
    7-bit weights; ``op_types`` limits which operators are quantized (``None``:
    all that ORT can; the others stay fp32).
    """

    activations: str = "u8"
    weights: str = "s8"
    reduce_range: bool = True
    per_channel: bool = True
    op_types: tuple[str, ...] | None = None


# Per target, following ORT's guidance for CPU inference (``quantize_static``'s
# docstring) and measured with ``benchmarks/edge_formats.py --variants`` on x86-64
# (docs/edge-serving.md): on ResNet-18 U8S8 ran at 0.31x fp32's latency and S8S8 at
# 0.83x; leaving depthwise convolutions or all but Conv/Gemm in fp32 made
# MobileNetV3 slower, not faster (more Q/DQ boundaries), so every target quantizes all.
STATIC_TARGETS: dict[str, StaticSettings] = {
    # x86 kernels are fast for u8 x s8 only. Without VNNI the products are summed into
    # saturating int16 pairs: 7-bit weights avoid that (on the trained demo CNN, 8-bit
    # weights disagreed with PyTorch on 1.1% of the test split; 7-bit on 0%).
    "x86-64": StaticSettings("u8", "s8", reduce_range=True),
    # VNNI accumulates in int32 without saturating: the full 8 bits, same speed.
    "x86-64-vnni": StaticSettings("u8", "s8", reduce_range=False),
    # ARM's int8 kernels prefer symmetric int8 activations (ORT's guidance); not
    # measured here (no ARM machine), so the choice rests on that guidance.
    "arm64": StaticSettings("s8", "s8", reduce_range=False),
}
DEFAULT_TARGET = "x86-64"  # safe on every x86-64 CPU; costs nothing measurable with VNNI


def preprocess_for_quantization(model_in: Path | str, model_out: Path | str) -> Path:
    """Run ORT's ``quant_pre_process`` (symbolic shape inference, constant folding).

    Raises
    ------
    ExportError
        If ONNX Runtime cannot analyse the model.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(model_in), str(model_out))
    except Exception as e:  # ORT and onnx raise many types here
        raise ExportError(
            f"cannot prepare {Path(model_in).name} for quantization: {type(e).__name__}: {e}"
        ) from e
    return Path(model_out)


def quantize_onnx_dynamic(model_in: Path | str, model_out: Path | str) -> Path:
    """Write a dynamically quantized copy of ``model_in`` (int8 weights) to ``model_out``.

    Parameters
    ----------
    model_in
        An fp32 ONNX model (one self-contained file).
    model_out
        Where to write the quantized model (written atomically).

    Returns
    -------
    Path
        ``model_out``.

    Raises
    ------
    ExportError
        If ONNX Runtime cannot quantize the model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model_out = Path(model_out)
    with tempfile.TemporaryDirectory(prefix="fedge-quant-") as work:
        prepared = preprocess_for_quantization(model_in, Path(work) / "prepared.onnx")
        try:
            with atomic_path(model_out) as tmp:
                quantize_dynamic(prepared, tmp, weight_type=QuantType.QInt8)
        except Exception as e:  # ORT raises many types here
            raise ExportError(
                f"dynamic int8 quantization of {Path(model_in).name} failed: "
                f"{type(e).__name__}: {e}"
            ) from e
    log.info("dynamic int8: %s -> %s", model_in, model_out)
    return model_out


def quantize_onnx_static(
    model_in: Path | str,
    model_out: Path | str,
    reader: CalibrationDataReader,
    *,
    per_channel: bool = True,
    method: CalibrationMethodName = "percentile",
    target: str | StaticSettings = DEFAULT_TARGET,
) -> Path:
    """Write a statically quantized (QDQ, int8 weights and activations) copy of ``model_in``.

    Parameters
    ----------
    model_in
        An fp32 ONNX model (one self-contained file).
    model_out
        Where to write the quantized model (written atomically).
    reader
        Calibration inputs; rewound before use, so a reader can serve several models.
    per_channel
        One weight scale per output channel (more accurate for convolutions).
    method
        How activation ranges are chosen from the calibration data: ``percentile``
        (the 99.999th percentile of |x|, clipping rare outliers; the default, as
        accurate as or more than ``minmax`` on the demo CNNs), ``minmax`` (the
        observed range) or ``entropy``. A histogram method that cannot bin the
        activations (a near-zero range) falls back to ``minmax``.
    target
        The CPU the artifact is for: a name in ``STATIC_TARGETS`` (``x86-64``,
        ``x86-64-vnni``, ``arm64``) or explicit ``StaticSettings``.

    Returns
    -------
    Path
        ``model_out``.

    Raises
    ------
    ExportError
        If ONNX Runtime cannot calibrate or quantize the model.
    """
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ExportError(f"unknown calibration method {method!r}; use one of {sorted(methods)}")
    if isinstance(target, str):
        if target not in STATIC_TARGETS:
            raise ExportError(f"unknown target {target!r}; use one of {sorted(STATIC_TARGETS)}")
        target = STATIC_TARGETS[target]
    if not per_channel:
        target = StaticSettings(**{**target.__dict__, "per_channel": False})
    model_out = Path(model_out)
    with tempfile.TemporaryDirectory(prefix="fedge-quant-") as work:
        prepared = preprocess_for_quantization(model_in, Path(work) / "prepared.onnx")
        used = method
        try:
            chatter = _quantize_static(prepared, model_out, reader, target, methods[method])
        except ValueError as e:
            if method == "minmax":
                raise _static_failed(model_in, e) from e
            # ORT's histogram cannot bin activations whose range is ~0 (an untrained
            # network's, for one): the observed min/max is then the only sensible range.
            log.warning("%s calibration failed (%s); using minmax", method, e)
            used = "minmax"
            try:
                chatter = _quantize_static(
                    prepared, model_out, reader, target, CalibrationMethod.MinMax
                )
            except Exception as again:  # ORT raises many types here
                raise _static_failed(model_in, again) from again
        except Exception as e:  # ORT raises many types here
            raise _static_failed(model_in, e) from e
    log.debug("calibration output: %s", chatter.strip())
    log.info("static int8 (%s, %s): %s -> %s", used, target, model_in, model_out)
    return model_out


def _static_failed(model_in: Path | str, error: BaseException) -> ExportError:
    return ExportError(
        f"static int8 quantization of {Path(model_in).name} failed: {type(error).__name__}: {error}"
    )


def _quantize_static(
    prepared: Path,
    model_out: Path,
    reader: CalibrationDataReader,
    settings: StaticSettings,
    method: Any,
) -> str:
    """One ``quantize_static`` call with ``settings``; returns what ORT printed."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    rewind = getattr(reader, "rewind", None)
    if callable(rewind):
        rewind()
    # The histogram calibrators print progress to stdout; keep it for the debug log.
    chatter = io.StringIO()
    extra = {} if settings.op_types is None else {"op_types_to_quantize": list(settings.op_types)}
    with atomic_path(model_out) as tmp, contextlib.redirect_stdout(chatter):
        quantize_static(
            prepared,
            tmp,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=settings.per_channel,
            activation_type=types[settings.activations],
            weight_type=types[settings.weights],
            reduce_range=settings.reduce_range,
            calibrate_method=method,
            **extra,
        )
    return chatter.getvalue()
