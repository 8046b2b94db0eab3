"""From a global model to a signed edge bundle: export, quantize, validate, bundle.

``export_bundle`` is what ``fedge export`` and the demo call. It loads a run's
checkpoint and its evaluation/calibration data, then ``export_model`` builds
every requested artifact (a conversion error skips that artifact with its
reason; the others go on), validates each against PyTorch, and bundles the ones
that pass. If some fail validation the bundle is still written with the passing
ones, and ``ArtifactsFailed`` (an ``ExportError``, non-zero exit) names the
failures; it carries the report so callers can still show the table.
"""

import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedge.edge.export import bundle_writer, validate
from fedge.edge.export.bundle_writer import BuiltArtifact
from fedge.edge.export.calibration import (
    DEFAULT_CALIBRATION_EXAMPLES,
    CalibrationReader,
    PreparedData,
    load_prepared,
    resolve_data_specs,
)
from fedge.edge.export.model_card import (
    complete_card,
    default_version,
    describe_spec,
    read_summary,
    run_dir_of,
    source_card,
)
from fedge.edge.export.onnx_export import set_metadata
from fedge.shared import signing
from fedge.shared.bundle import ARTIFACT_FORMATS
from fedge.shared.errors import ConfigError, ExportError
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "dynamic", "static")


@dataclass(frozen=True)
class _Plan:
    """One artifact to build: ``needs`` is the artifact it is quantized from."""

    name: str
    format: str
    precision: str
    quantization: str
    needs: str | None = None
    bundled: bool = True


@dataclass
class ExportReport:
    """What an export did: the bundle (if any), the validation table, skips and failures."""

    bundle_dir: Path | None
    rows: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    version: str = ""
    bundle_id: str | None = None
    validation_path: Path | None = None

    def table(self) -> Any:
        """The validation table as a rich ``Table``."""
        return validate.render_table(self.rows, title=f"Validation of {self.version}")


class ArtifactsFailed(ExportError):
    """Some artifacts failed validation; ``report`` says which and whether a bundle was written."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


def plan_artifacts(
    formats: Sequence[str], quantize: Sequence[str]
) -> tuple[list[_Plan], dict[str, str]]:
    """The artifacts to build for ``formats`` x ``quantize``, and those skipped up front.

    An fp32 model is always built when a quantized one needs it; it is bundled
    only when ``none`` is asked for. TFLite int8 is dynamic-range only.
    """
    plans: list[_Plan] = []
    skipped: dict[str, str] = {}
    if "onnx" in formats:
        plans.append(_Plan("model-fp32.onnx", "onnx", "fp32", "none", bundled="none" in quantize))
        for mode in ("dynamic", "static"):
            if mode in quantize:
                name = f"model-int8-{mode}.onnx"
                plans.append(_Plan(name, "onnx", "int8", mode, "model-fp32.onnx"))
    if "tflite" in formats:
        int8 = "dynamic" in quantize
        if int8 or "none" in quantize:
            fp32 = _Plan("model-fp32.tflite", "tflite", "fp32", "none", bundled="none" in quantize)
            plans.append(fp32)
        if int8:
            plans.append(_Plan("model-int8.tflite", "tflite", "int8", "dynamic", fp32.name))
        elif "static" in quantize:
            skipped["model-int8.tflite"] = (
                "TFLite int8 is dynamic-range only (static int8 makes the model's I/O int8); "
                "add 'dynamic' to --quantize"
            )
    if not plans:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ConfigError(f"nothing to export ({why or 'no format or quantization chosen'})")
    return plans, skipped


def check_choices(formats: Sequence[str], quantize: Sequence[str]) -> None:
    """Raise ``ConfigError`` for unknown formats or quantization modes (all at once)."""
    errors = [f"unknown format {f!r}" for f in formats if f not in ARTIFACT_FORMATS]
    errors += [f"unknown quantization {q!r}" for q in quantize if q not in QUANTIZATIONS]
    if not formats or not quantize:
        errors.append("--formats and --quantize each need at least one value")
    if errors:
        raise ConfigError(
            "; ".join(errors) + f" (formats: {', '.join(ARTIFACT_FORMATS)}; "
            f"quantize: {', '.join(QUANTIZATIONS)})"
        )


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[str], Any]]:
    """Yield ``step(description)``, a context manager that advances one bar across steps."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task("export", total=total)

        @contextmanager
        def step(description: str) -> Iterator[None]:
            bar.update(task, description=description)
            try:
                yield
            finally:
                bar.advance(task)

        yield step


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _builders(
    model: nn.Module,
    sample: torch.Tensor,
    work: Path,
    reader: CalibrationReader | None,
    target: str = "x86-64",
) -> dict[str, Callable[[Path], Path]]:
    from fedge.edge.export.onnx_export import export_onnx
    from fedge.edge.export.quantize import quantize_onnx_dynamic, quantize_onnx_static
    from fedge.edge.export.tflite_export import export_tflite, quantize_tflite_dynamic

    def static(path: Path) -> Path:
        if reader is None:
            raise ExportError("static quantization needs calibration data")
        return quantize_onnx_static(work / "model-fp32.onnx", path, reader, target=target)

    return {
        "model-fp32.onnx": lambda p: export_onnx(model, sample, p),
        "model-int8-dynamic.onnx": lambda p: quantize_onnx_dynamic(work / "model-fp32.onnx", p),
        "model-int8-static.onnx": static,
        "model-fp32.tflite": lambda p: export_tflite(model, sample, p),
        "model-int8.tflite": lambda p: quantize_tflite_dynamic(work / "model-fp32.tflite", p),
    }


def export_model(
    model: nn.Module,
    task: TaskSpec,
    out_dir: Path,
    *,
    eval_set: PreparedData,
    calibration: PreparedData | None,
    private_key: signing.Ed25519PrivateKey,
    version: str,
    formats: Sequence[str] = ARTIFACT_FORMATS,
    quantize: Sequence[str] = QUANTIZATIONS,
    max_accuracy_drop: float = 1.0,
    model_card: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    progress: bool = True,
    force: bool = False,
    target: str = "x86-64",
) -> ExportReport:
    """Export an in-memory model to a signed bundle (``export_bundle`` without the checkpoint).

    Parameters are those of ``export_bundle``, with the data already prepared,
    the key loaded, and ``model_card`` holding the facts about the model's origin
    (see ``fedge.edge.export.model_card.source_card``).

    Raises
    ------
    ArtifactsFailed
        Some artifacts failed validation (the bundle holds the rest), or none
        passed (no bundle); ``.report`` has the table.
    ExportError, ConfigError
        The destination exists (without ``force``), or bad options.
    """
    check_choices(formats, quantize)
    out_dir = Path(out_dir)
    bundle_writer.check_destination(out_dir, force)
    plans, skipped = plan_artifacts(formats, quantize)
    if any(p.quantization == "static" for p in plans) and calibration is None:
        raise ConfigError("static quantization needs calibration data (--calibration)")
    model = model.eval().cpu()
    fingerprint = signing.public_key_fingerprint(private_key)
    stamp = bundle_writer.onnx_metadata(version, task, fingerprint, privacy)
    total = len(plans) + sum(p.bundled for p in plans) + 2
    with tempfile.TemporaryDirectory(prefix="fedge-export-") as tmp, _progress(
        progress, total
    ) as step:
        work = Path(tmp)
        reader = None if calibration is None else CalibrationReader(calibration.x)
        builders = _builders(model, torch.from_numpy(eval_set.x[:1]), work, reader, target)
        built = _build_all(plans, builders, work, skipped, step)
        for artifact in built.values():
            if artifact.format == "onnx":
                # Stamped before validation and hashing: the bundle holds the validated bytes.
                set_metadata(artifact.path, stamp)
        with step("PyTorch reference"):
            reference = validate.reference_logits(model, eval_set.x)
        results: dict[str, validate.ValidationResult] = {}
        for plan in (p for p in plans if p.bundled):
            with step(f"validate {plan.name}"):
                if plan.name in built:
                    art = built[plan.name]
                    results[plan.name] = validate.validate_file(
                        art.path, art.name, art.format, art.precision, art.quantization,
                        eval_set.x, eval_set.y, reference, max_accuracy_drop=max_accuracy_drop,
                    )  # fmt: skip
        rows = validate.table_rows([p.name for p in plans if p.bundled], results, skipped)
        failed = [name for name, r in results.items() if not r.passed]
        passing = [(built[n], r) for n, r in results.items() if r.passed]
        report = ExportReport(None, rows, skipped, failed, version)
        report.validation_path = validate.write_validation_file(out_dir, rows)
        with step("sign bundle"):
            if not passing:
                raise ArtifactsFailed(_nothing_message(results, skipped), report)
            index = bundle_writer.choose_self_test(reference)
            probe = eval_set.x[index]
            # Run as one batch, as a device's self-test will: dynamic quantization's
            # activation scales depend on the batch they see.
            expected = {
                a.name: validate.predictor_for(a.path, a.format)(probe) for a, _ in passing
            }
            card = complete_card(
                model_card, version=version, task=task, rows=rows, skipped=skipped,
                failed=failed, privacy=privacy,
            )  # fmt: skip
            manifest = bundle_writer.write_bundle(
                out_dir,
                task=task,
                artifacts=passing,
                self_test_inputs=probe,
                self_test_expected=expected,
                self_test_labels=[int(v) for v in reference[index].argmax(1)],
                model_card=card,
                privacy=privacy,
                version=version,
                private_key=private_key,
                force=force,
            )
    report.bundle_dir, report.bundle_id = out_dir, manifest.bundle_id
    if failed:
        detail = ", ".join(f"{n} ({results[n].reason})" for n in failed)
        raise ArtifactsFailed(
            f"left out of bundle {out_dir} because they failed validation: {detail}", report
        )
    return report


def _build_all(
    plans: Sequence[_Plan],
    builders: Mapping[str, Callable[[Path], Path]],
    work: Path,
    skipped: dict[str, str],
    step: Callable[[str], Any],
) -> dict[str, BuiltArtifact]:
    """Build every planned artifact; a failure skips it (and what needs it) with its reason.

    Returns the bundle candidates; an fp32 model built only to be quantized is
    left out, and so is its skip reason (its dependents carry it).
    """
    built: dict[str, BuiltArtifact] = {}
    for plan in plans:
        with step(f"export {plan.name}"):
            if plan.needs is not None and plan.needs not in built:
                why = skipped.get(plan.needs, "not built")
                skipped[plan.name] = f"needs {plan.needs}, which could not be built: {why}"
                continue
            try:
                path = builders[plan.name](work / plan.name)
            except Exception as e:  # one artifact's failure must not stop the others
                log.warning("skipping %s: %s", plan.name, _reason(e))
                skipped[plan.name] = _reason(e)
                continue
            built[plan.name] = BuiltArtifact(
                plan.name, path, plan.format, plan.precision, plan.quantization
            )
    for plan in plans:
        if not plan.bundled:
            built.pop(plan.name, None)
            skipped.pop(plan.name, None)
    return built


def _nothing_message(
    results: Mapping[str, validate.ValidationResult], skipped: Mapping[str, str]
) -> str:
    parts = [f"{n} failed ({r.reason})" for n, r in results.items()]
    parts += [f"{n} skipped ({why})" for n, why in skipped.items()]
    return "no artifact passed validation, so no bundle was written: " + "; ".join(parts)


def export_bundle(
    source: Path,
    out_dir: Path,
    *,
    formats: Sequence[str] = ARTIFACT_FORMATS,
    quantize: Sequence[str] = QUANTIZATIONS,
    calibration: str | None = None,
    eval_data: str | None = None,
    signing_key: Path | None = None,
    max_accuracy_drop: float = 1.0,
    progress: bool = True,
    force: bool = False,
    version: str | None = None,
    target: str = "x86-64",
) -> ExportReport:
    """Export a run's global model (or a checkpoint) to a validated, signed edge bundle.

    Parameters
    ----------
    source
        A run directory (its ``model.safetensors``, else its latest round
        checkpoint) or a checkpoint file.
    out_dir
        The bundle directory to create.
    formats
        Any of ``onnx``, ``tflite``.
    quantize
        Any of ``none`` (fp32), ``dynamic`` (int8 weights) and ``static`` (int8
        weights and activations, calibrated; ONNX only).
    calibration, eval_data
        Data specs (as ``fedge client start --data``) for static calibration and
        for validation; default for built-in tasks: ``TASK:public`` and ``TASK:test``.
        User tasks must pass them.
    signing_key
        The Ed25519 private key (default ``fedge.shared.paths.signing_key_path()``).
    max_accuracy_drop
        Accuracy points an artifact may lose against PyTorch and still be bundled.
    progress
        Show a progress bar.
    force
        Replace an existing ``out_dir``.
    version
        The bundle version (default ``<run>-r<round>-<UTC time>``).
    target
        The device CPU static int8 is tuned for: ``x86-64`` (the default; any x86
        CPU), ``x86-64-vnni`` or ``arm64`` (``quantize.STATIC_TARGETS``).

    Returns
    -------
    ExportReport
        The bundle path and id, the validation rows, skipped artifacts with reasons.

    Raises
    ------
    SecurityError
        No signing key (run ``fedge keys create``).
    ConfigError, DataError, ModelError
        Bad options, data or checkpoint.
    ArtifactsFailed
        Some artifacts failed validation (the bundle holds the others) or none
        passed (no bundle); ``.report`` has the table.
    """
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.checkpoint import (
        load_checkpoint,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    check_choices(formats, quantize)
    private_key = bundle_writer.load_signing_key(signing_key)
    out_dir, source = Path(out_dir), Path(source)
    bundle_writer.check_destination(out_dir, force)
    ckpt = load_checkpoint(resolve_checkpoint(source))
    cfg = RunConfig.from_flower(ckpt.config)
    model = load_model_from_checkpoint(ckpt)
    plans, _ = plan_artifacts(formats, quantize)
    needs_calibration = any(p.quantization == "static" for p in plans)
    eval_spec, calibration_spec = resolve_data_specs(
        ckpt.task, eval_data, calibration, needs_calibration
    )
    eval_set = load_prepared(eval_spec, ckpt.task, label_column=cfg.label_column)
    calibration_set = (
        load_prepared(calibration_spec, ckpt.task, DEFAULT_CALIBRATION_EXAMPLES, cfg.label_column)
        if calibration_spec
        else None
    )
    run_dir = run_dir_of(source, ckpt.path)
    summary = read_summary(run_dir)
    card = source_card(ckpt, cfg, run_dir, summary)
    card["export"] = {
        "formats": list(formats),
        "quantize": list(quantize),
        "eval_data": describe_spec(eval_spec),
        "eval_examples": len(eval_set),
        "calibration": describe_spec(calibration_spec),
        "calibration_examples": 0 if calibration_set is None else len(calibration_set),
        "max_accuracy_drop": max_accuracy_drop,
    }
    return export_model(
        model,
        ckpt.task,
        out_dir,
        eval_set=eval_set,
        calibration=calibration_set,
        private_key=private_key,
        version=version or default_version(run_dir.name, ckpt.round),
        formats=formats,
        quantize=quantize,
        max_accuracy_drop=max_accuracy_drop,
        model_card=card,
        privacy=summary.get("privacy"),
        progress=progress,
        force=force,
        target=target,
    )
