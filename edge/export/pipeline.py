"""From a global model to a signed edge bundle: export, then validate, as two steps.

``export`` builds every requested artifact (a conversion error skips that
artifact with its reason; the others go on) and writes a signed bundle whose
artifacts carry no validation result. ``export_model`` runs it into a staging
directory, then (unless told not to) validates the bundle with the device
runtime and records the outcome (``validate_bundle.validate_and_record``), and
only then renames it into place. ``export_bundle`` is what ``fedge export`` and
the demo call: it loads a run's checkpoint and its evaluation/calibration data
first. If some artifacts fail validation the bundle is still written with the
passing ones, and ``ArtifactsFailed`` (an ``ExportError``, non-zero exit) names
the failures; it carries the report so callers can still show the table.
"""

import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedge.edge.export import bundle_writer
from fedge.edge.export import validate as validate_mod
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
from fedge.shared import bundle, signing
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
    validated: bool = True
    note: str = ""  # federated: "evaluated at K sites on N examples (federated)"
    federated: Any = None  # federated: the ``FederatedEvaluation``

    def table(self) -> Any:
        """The validation table as a rich ``Table``."""
        title = "Validation" if self.validated else "Exported (not validated)"
        title = f"{title} of {self.version}" + (f"\n{self.note}" if self.note else "")
        return validate_mod.render_table(self.rows, title=title)


class ArtifactsFailed(ExportError):
    """Some artifacts failed validation; ``report`` says which and whether a bundle was written."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


def plan_artifacts(
    formats: Sequence[str], quantize: Sequence[str], static_tflite: bool = False
) -> tuple[list[_Plan], dict[str, str]]:
    """The artifacts to build for ``formats`` x ``quantize``, and those skipped up front.

    An fp32 model is always built when a quantized one needs it; it is bundled
    only when ``none`` is asked for. TFLite int8 is dynamic-range, and static as
    well only with ranges from federated calibration (``static_tflite``).
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
        static = static_tflite and "static" in quantize
        if int8 or static or "none" in quantize:
            fp32 = _Plan("model-fp32.tflite", "tflite", "fp32", "none", bundled="none" in quantize)
            plans.append(fp32)
        if int8:
            plans.append(_Plan("model-int8.tflite", "tflite", "int8", "dynamic", fp32.name))
        if static:
            name = "model-int8-static.tflite"
            plans.append(_Plan(name, "tflite", "int8", "static", fp32.name))
        elif "static" in quantize and not int8:
            skipped["model-int8.tflite"] = (
                "TFLite int8 is dynamic-range only unless federated calibration gives the "
                "ranges (static int8 makes the model's I/O int8); add 'dynamic' to --quantize"
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
def _progress(enabled: bool, total: int, console: Any = None) -> Iterator[Callable[[str], Any]]:
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
    with Progress(*columns, disable=not enabled, console=console) as bar:
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
    static_quantizer: Callable[[Path, Path], Path] | None = None,
    static_tflite_quantizer: Callable[[Path, Path], Path] | None = None,
) -> dict[str, Callable[[Path], Path]]:
    from fedge.edge.export.onnx_export import export_onnx
    from fedge.edge.export.quantize import quantize_onnx_dynamic, quantize_onnx_static
    from fedge.edge.export.tflite_export import export_tflite, quantize_tflite_dynamic

    def static(path: Path) -> Path:
        if static_quantizer is not None:  # ranges from elsewhere (federated calibration)
            return static_quantizer(work / "model-fp32.onnx", path)
        if reader is None:
            raise ExportError("static quantization needs calibration data")
        return quantize_onnx_static(work / "model-fp32.onnx", path, reader, target=target)

    def static_tflite(path: Path) -> Path:
        if static_tflite_quantizer is None:
            raise ExportError("static TFLite int8 needs ranges from federated calibration")
        return static_tflite_quantizer(work / "model-fp32.tflite", path)

    return {
        "model-fp32.onnx": lambda p: export_onnx(model, sample, p),
        "model-int8-dynamic.onnx": lambda p: quantize_onnx_dynamic(work / "model-fp32.onnx", p),
        "model-int8-static.onnx": static,
        "model-fp32.tflite": lambda p: export_tflite(model, sample, p),
        "model-int8.tflite": lambda p: quantize_tflite_dynamic(work / "model-fp32.tflite", p),
        "model-int8-static.tflite": static_tflite,
    }


@dataclass
class Exported:
    """What ``export`` wrote: the (unvalidated) bundle and the artifacts it could not build."""

    bundle_dir: Path
    bundle_id: str
    order: list[str]  # every bundled artifact planned, built or not, in plan order
    sizes: dict[str, int]  # built artifacts' sizes by name
    skipped: dict[str, str]


def _no_step(description: str) -> Any:
    return nullcontext()


def export(
    model: nn.Module,
    task: TaskSpec,
    out_dir: Path,
    *,
    private_key: signing.Ed25519PrivateKey,
    version: str,
    sample: torch.Tensor | None = None,
    calibration: PreparedData | None = None,
    formats: Sequence[str] = ARTIFACT_FORMATS,
    quantize: Sequence[str] = QUANTIZATIONS,
    model_card: Mapping[str, Any] | None = None,
    privacy: Mapping[str, Any] | None = None,
    force: bool = False,
    step: Callable[[str], Any] = _no_step,
    target: str = "x86-64",
    static_quantizer: Callable[[Path, Path], Path] | None = None,
    static_tflite_quantizer: Callable[[Path, Path], Path] | None = None,
) -> Exported:
    """Build every requested artifact and write them into a signed, unvalidated bundle.

    An artifact that fails to build is skipped with its reason; the others go
    on. Nothing is run or compared here: ``fedge.edge.export.validate.validate``
    does that, and ``bundle_writer.record_validation`` records it. Until then
    every artifact's ``validation`` is null, so no device runs it.

    Parameters
    ----------
    model, task
        The PyTorch classifier and its task.
    out_dir
        The bundle directory to create.
    private_key, version
        The signing key and the bundle version.
    sample
        One preprocessed input to trace with (default: zeros of the task's input shape).
    calibration
        Inputs for static int8 calibration (needed when ``static`` is asked for).
    formats, quantize
        What to build (see ``export_bundle``).
    model_card, privacy
        The card's facts about the model (``source_card`` + export settings) and
        the run's privacy record.
    force
        Replace an existing ``out_dir``.
    step
        ``step(description)`` returns a context manager around each step (progress).
    target
        The device CPU static int8 is tuned for (``quantize.STATIC_TARGETS``).
    static_quantizer
        ``(fp32_onnx, out) -> out`` to build static int8 instead of calibrating on
        ``calibration`` (federated calibration: ``fedge.edge.export.federated_export``).
    static_tflite_quantizer
        ``(fp32_tflite, out) -> out``: static int8 TFLite (``model-int8-static.tflite``)
        from federated ranges (``federated_quantize.federated_static_quantizer``);
        without it TFLite int8 is dynamic-range only.

    Raises
    ------
    ExportError
        No artifact could be built, or ``out_dir`` exists (without ``force``).
    ConfigError
        Bad options, or static quantization without calibration data.
    """
    check_choices(formats, quantize)
    out_dir = Path(out_dir)
    bundle_writer.check_destination(out_dir, force)
    plans, skipped = plan_artifacts(
        formats, quantize, static_tflite=static_tflite_quantizer is not None
    )
    static = any(p.quantization == "static" and p.format == "onnx" for p in plans)
    if static and calibration is None and static_quantizer is None:
        raise ConfigError("static quantization needs calibration data (--calibration)")
    model = model.eval().cpu()
    if sample is None:
        sample = torch.zeros(1, *task.input_shape)
    fingerprint = signing.public_key_fingerprint(private_key)
    stamp = bundle_writer.onnx_metadata(version, task, fingerprint, privacy)
    with tempfile.TemporaryDirectory(prefix="fedge-export-") as tmp:
        work = Path(tmp)
        reader = None if calibration is None else CalibrationReader(calibration.x)
        builders = _builders(
            model, sample[:1], work, reader, target, static_quantizer, static_tflite_quantizer
        )
        built = _build_all(plans, builders, work, skipped, step)
        if not built:
            why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
            raise ExportError(f"no artifact could be exported ({why})")
        for artifact in built.values():
            if artifact.format == "onnx":
                # Stamped before validation and hashing: the bundle holds the validated bytes.
                set_metadata(artifact.path, stamp)
        card = complete_card(
            model_card, version=version, task=task, skipped=skipped, privacy=privacy
        )
        with step("sign bundle"):
            manifest = bundle_writer.write_bundle(
                out_dir, task=task, artifacts=list(built.values()), model_card=card,
                privacy=privacy, version=version, private_key=private_key, force=force,
            )  # fmt: skip
    return Exported(
        out_dir,
        manifest.bundle_id,
        [p.name for p in plans if p.bundled],
        {Path(a.file).name: a.size for a in manifest.artifacts},
        skipped,
    )


def export_model(
    model: nn.Module,
    task: TaskSpec,
    out_dir: Path,
    *,
    eval_set: PreparedData | None,
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
    validate: bool = True,
    eval_spec: str | None = None,
    console: Any = None,
) -> ExportReport:
    """``export``, then (unless ``validate`` is false) validate and record, then move into place.

    Parameters are those of ``export_bundle``, with the data already prepared,
    the key loaded, and ``model_card`` holding the facts about the model's origin
    (see ``fedge.edge.export.model_card.source_card``). ``eval_set`` may be
    ``None`` only when ``validate`` is false.

    Raises
    ------
    ArtifactsFailed
        Some artifacts failed validation (the bundle holds the rest), or none
        passed (no bundle); ``.report`` has the table.
    ExportError, ConfigError
        The destination exists (without ``force``), or bad options.
    """
    from fedge.edge.export.validate_bundle import validate_and_record

    check_choices(formats, quantize)
    out_dir = Path(out_dir)
    bundle_writer.check_destination(out_dir, force)
    if validate and eval_set is None:
        raise ConfigError("validation needs evaluation data (--eval-data), or pass --no-validate")
    plans, _ = plan_artifacts(formats, quantize)
    total = len(plans) + 1 + (2 if validate else 0)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    message = ""  # why artifacts were left out, when some were
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp:
        staged = Path(tmp) / out_dir.name
        with _progress(progress, total, console) as step:
            exported = export(
                model, task, staged, private_key=private_key, version=version,
                sample=None if eval_set is None else torch.from_numpy(eval_set.x[:1]),
                calibration=calibration, formats=formats, quantize=quantize,
                model_card=model_card, privacy=privacy, step=step, target=target,
            )  # fmt: skip
            report = ExportReport(None, [], exported.skipped, [], version, validated=validate)
            if not validate:
                report.rows = validate_mod.table_rows(exported.order, {}, exported.skipped,
                                                      exported.sizes)  # fmt: skip
                _remove_stale_validation_file(out_dir)
            else:
                assert eval_set is not None
                with step("PyTorch reference"):
                    reference = validate_mod.reference_logits(model.eval().cpu(), eval_set.x)
                with step("validate with the device runtime"):
                    outcome = validate_and_record(
                        staged, private_key, eval_set, reference, order=exported.order,
                        skipped=exported.skipped, max_accuracy_drop=max_accuracy_drop,
                        eval_spec=eval_spec, out_dir=out_dir,
                    )  # fmt: skip
                report.rows, report.failed = outcome.rows, outcome.failed
                report.validation_path, message = outcome.validation_path, outcome.message
                if outcome.manifest is None:
                    raise ArtifactsFailed(message, report)
        bundle_writer.replace_dir(staged, out_dir)
    manifest = bundle.read_manifest(out_dir)
    report.bundle_dir, report.bundle_id = out_dir, manifest.bundle_id
    if report.failed:
        raise ArtifactsFailed(message, report)
    return report


def _remove_stale_validation_file(out_dir: Path) -> None:
    """An unvalidated bundle must not sit beside the validation table of an older one."""
    validate_mod.validation_file_path(out_dir).unlink(missing_ok=True)


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
    validate: bool = True,
    console: Any = None,
    federated: Any = None,
    static_tflite: bool = True,
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
        Show a progress bar (on ``console``, a ``rich`` Console; default: rich's own).
    force
        Replace an existing ``out_dir``.
    version
        The bundle version (default ``<run>-r<round>-<UTC time>``).
    target
        The device CPU static int8 is tuned for: ``x86-64`` (the default; any x86
        CPU), ``x86-64-vnni`` or ``arm64`` (``quantize.STATIC_TARGETS``).
    validate
        Validate the artifacts and record the results (default). ``False``
        (``--no-validate``) writes a bundle whose artifacts carry no validation
        result: no device runs them until ``fedge validate`` records one.
    federated
        A ``fedge.edge.export.federated.FederatedTarget``: calibrate static int8 and
        validate through the run's sites instead of on central data
        (``fedge.edge.export.federated_export``); ``calibration`` and ``eval_data`` must
        then be ``None``.
    static_tflite
        With ``federated``: also build a static int8 TFLite from the sites' ranges.

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
    validate_mod.check_max_accuracy_drop(max_accuracy_drop)
    private_key = bundle_writer.load_signing_key(signing_key)
    out_dir, source = Path(out_dir), Path(source)
    bundle_writer.check_destination(out_dir, force)
    ckpt = load_checkpoint(resolve_checkpoint(source))
    cfg = RunConfig.from_flower(ckpt.config)
    model = load_model_from_checkpoint(ckpt)
    plans, _ = plan_artifacts(formats, quantize)
    needs_calibration = any(p.quantization == "static" for p in plans)
    if federated is not None:
        if not validate:
            raise ConfigError("--federated validates at the sites; it cannot be --no-validate")
        return _export_bundle_federated(
            source, ckpt, cfg, model, out_dir, federated, private_key=private_key,
            version=version, formats=formats, quantize=quantize,
            max_accuracy_drop=max_accuracy_drop, progress=progress, force=force,
            target=target, console=console, calibration=calibration, eval_data=eval_data,
            needs_calibration=needs_calibration, static_tflite=static_tflite,
        )  # fmt: skip
    eval_spec, calibration_spec = resolve_data_specs(
        ckpt.task, eval_data, calibration, needs_calibration, needs_eval=validate
    )
    eval_set = (
        load_prepared(eval_spec, ckpt.task, label_column=cfg.label_column) if eval_spec else None
    )
    calibration_set = (
        load_prepared(calibration_spec, ckpt.task, DEFAULT_CALIBRATION_EXAMPLES, cfg.label_column)
        if calibration_spec
        else None
    )
    run_dir, summary, card = _run_card(
        source, ckpt, cfg, formats, quantize, describe_spec(calibration_spec),
        0 if calibration_set is None else len(calibration_set),
    )  # fmt: skip
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
        validate=validate,
        eval_spec=eval_spec,
        console=console,
    )


def _run_card(
    source: Path,
    ckpt: Any,
    cfg: Any,
    formats: Sequence[str],
    quantize: Sequence[str],
    calibration: str | None,
    calibration_examples: int | None,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The run's folder, its summary, and the model card with what this export does."""
    run_dir = run_dir_of(source, ckpt.path)
    summary = read_summary(run_dir)
    card = source_card(ckpt, cfg, run_dir, summary)
    card["export"] = {
        "formats": list(formats),
        "quantize": list(quantize),
        "calibration": calibration,
        "calibration_examples": calibration_examples,
    }
    return run_dir, summary, card


def _export_bundle_federated(
    source: Path,
    ckpt: Any,
    cfg: Any,
    model: nn.Module,
    out_dir: Path,
    federated: Any,
    *,
    private_key: signing.Ed25519PrivateKey,
    version: str | None,
    formats: Sequence[str],
    quantize: Sequence[str],
    max_accuracy_drop: float,
    progress: bool,
    force: bool,
    target: str,
    console: Any,
    calibration: str | None,
    eval_data: str | None,
    needs_calibration: bool,
    static_tflite: bool,
) -> ExportReport:
    """``export_bundle`` through the run's sites (``fedge.edge.export.federated_export``)."""
    from fedge.edge.export.federated_export import FederatedSource, export_federated

    if calibration is not None or eval_data is not None:
        raise ConfigError(
            "--federated calibrates and validates at the sites; it takes no --calibration "
            "or --eval-data (drop them, or drop --federated to use central data)"
        )
    calibration_source = "federated activation histograms (2 passes)"
    run_dir, summary, card = _run_card(
        source, ckpt, cfg, formats, quantize,
        calibration_source if needs_calibration else None, None,
    )  # fmt: skip
    report: ExportReport = export_federated(
        model, ckpt.task, out_dir, source=FederatedSource(cfg, run_dir, ckpt.path),
        target=federated, private_key=private_key,
        version=version or default_version(run_dir.name, ckpt.round), formats=formats,
        quantize=quantize, max_accuracy_drop=max_accuracy_drop, model_card=card,
        privacy=summary.get("privacy"), progress=progress, force=force, cpu_target=target,
        console=console, static_tflite=static_tflite,
    )  # fmt: skip
    return report
