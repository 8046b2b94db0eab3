"""Validate a bundle with the device runtime and record the outcome: export's second step.

``validate_and_record`` is where the caller decides what a mismatch means (as
Optimum's ``onnx_export_from_model`` does around ``validate_model_outputs``):
artifacts that fail are named and left out of the bundle, the others are
recorded with the self-test logits the device runtime computed. ``export_model``
runs it on a freshly exported bundle; ``revalidate_bundle`` (``fedge validate``)
runs it on an existing one, for example one exported with ``--no-validate``.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedge.edge.export import bundle_writer
from fedge.edge.export.calibration import PreparedData
from fedge.edge.export.model_card import validation_card
from fedge.edge.export.validate import (
    ValidationFailed,
    ValidationResult,
    table_rows,
    validate,
    write_validation_file,
)
from fedge.shared import bundle, signing
from fedge.shared.errors import ConfigError

if TYPE_CHECKING:  # pipeline imports this module: import it lazily at run time
    from fedge.edge.export.pipeline import ExportReport

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What validation found and recorded; ``manifest`` is ``None`` when nothing passed."""

    rows: list[dict[str, object]]
    results: list[ValidationResult]
    failed: list[str]
    manifest: bundle.Manifest | None
    validation_path: Path
    message: str = ""
    skipped: dict[str, str] = field(default_factory=dict)


def validate_and_record(
    bundle_dir: Path,
    private_key: signing.Ed25519PrivateKey,
    eval_set: PreparedData,
    reference: np.ndarray,
    *,
    order: Sequence[str],
    skipped: Mapping[str, str],
    max_accuracy_drop: float,
    eval_spec: str | None,
    out_dir: Path,
) -> Outcome:
    """Validate every artifact of ``bundle_dir``, then record the passing ones in it.

    Parameters
    ----------
    bundle_dir
        The bundle to validate (signed by ``private_key``); rewritten in place.
    private_key
        The signing key: the bundle must verify under its public half, and is signed again.
    eval_set, reference
        Evaluation inputs and labels, and PyTorch's logits on them.
    order, skipped
        The table's artifact order, and artifacts export skipped with their reasons.
    max_accuracy_drop
        Accuracy points an artifact may lose against PyTorch and still pass.
    eval_spec
        The evaluation data spec, for the model card.
    out_dir
        Where the bundle will live: ``<out_dir>.validation.json`` is written beside it.

    Returns
    -------
    Outcome
        The table, results, failures and the new manifest (``None`` when nothing
        passed: then the bundle is left as it was and ``message`` says why).
    """
    try:
        results = validate(
            bundle_dir, private_key.public_key(), eval_set.x, eval_set.y, reference,
            max_accuracy_drop=max_accuracy_drop,
        )  # fmt: skip
    except ValidationFailed as e:
        # Our decision on a mismatch: keep the artifacts that passed, name the rest.
        results = e.results
    by_name = {r.artifact: r for r in results}
    rows = table_rows(order, by_name, skipped)
    failed = [r.artifact for r in results if not r.passed]
    path = write_validation_file(out_dir, rows)
    if len(failed) == len(results):
        parts = [f"{r.artifact} failed ({r.reason})" for r in results]
        parts += [f"{n} skipped ({why})" for n, why in skipped.items()]
        message = "no artifact passed validation, so no bundle was written: " + "; ".join(parts)
        return Outcome(rows, results, failed, None, path, message, dict(skipped))
    index = bundle_writer.choose_self_test(reference)
    card = validation_card(
        rows, failed, eval_spec=eval_spec, eval_examples=len(eval_set),
        max_accuracy_drop=max_accuracy_drop,
    )  # fmt: skip
    manifest = bundle_writer.record_validation(
        bundle_dir, results, self_test_inputs=eval_set.x[index],
        self_test_labels=[int(v) for v in reference[index].argmax(1)],
        card_updates=card, private_key=private_key,
    )  # fmt: skip
    message = ""
    if failed:
        detail = ", ".join(f"{n} ({by_name[n].reason})" for n in failed)
        message = f"left out of bundle {out_dir} because they failed validation: {detail}"
    return Outcome(rows, results, failed, manifest, path, message, dict(skipped))


def default_source(bundle_dir: Path) -> Path:
    """The model a bundle was exported from, where ``fedge export`` puts bundles by default.

    ``RUN_DIR/bundle`` comes from ``RUN_DIR``; ``NAME-bundle`` from ``NAME.safetensors``.

    Raises
    ------
    ConfigError
        If neither is there (then ``--model`` must name it).
    """
    parent = bundle_dir.parent
    candidates = [parent]
    if bundle_dir.name.endswith("-bundle"):
        candidates.insert(0, parent / f"{bundle_dir.name[: -len('-bundle')]}.safetensors")
    for candidate in candidates:
        if (
            candidate.is_file()
            or (candidate / "model.safetensors").is_file()
            or (candidate / "checkpoints").is_dir()
        ):
            return candidate
    raise ConfigError(
        f"cannot tell which model {bundle_dir} was exported from",
        hint="pass --model RUN_DIR|CHECKPOINT (the PyTorch reference to validate against)",
    )


def revalidate_bundle(
    bundle_dir: Path,
    *,
    source: Path | None = None,
    eval_data: str | None = None,
    signing_key: Path | None = None,
    max_accuracy_drop: float = 1.0,
) -> "ExportReport":
    """Validate an existing bundle again (or for the first time) and record the results.

    Parameters
    ----------
    bundle_dir
        A bundle signed with ``signing_key`` (validated or exported with ``--no-validate``).
    source
        The run directory or checkpoint it was exported from: the PyTorch
        reference (default: ``default_source``). Its task, round and checkpoint
        name must match the bundle's model card.
    eval_data
        Data spec to validate on (default for built-in tasks: ``TASK:test``).
    signing_key
        The Ed25519 private key that signed the bundle and signs it again.
    max_accuracy_drop
        Accuracy points an artifact may lose against PyTorch and still pass.

    Returns
    -------
    ExportReport
        The validation table and the (re-signed) bundle's id.

    Raises
    ------
    ArtifactsFailed
        Some artifacts failed (left out of the bundle) or none passed (the bundle
        is left as it was); ``.report`` has the table.
    ConfigError, BundleError, SecurityError, DataError
        A source that does not match, a bundle that does not verify, no key, bad data.
    """
    from fedge.edge.export.calibration import load_prepared, resolve_data_specs
    from fedge.edge.export.pipeline import ArtifactsFailed, ExportReport
    from fedge.edge.export.validate import check_max_accuracy_drop, reference_logits
    from fedge.shared.config import RunConfig
    from fedge.shared.ml.checkpoint import (
        load_checkpoint,
        load_model_from_checkpoint,
        resolve_checkpoint,
    )

    check_max_accuracy_drop(max_accuracy_drop)
    bundle_dir = Path(bundle_dir)
    private_key = bundle_writer.load_signing_key(signing_key)
    manifest = bundle.verify_bundle(bundle_dir, private_key.public_key())
    card = json.loads((bundle_dir / bundle.MODEL_CARD).read_text(encoding="utf-8"))
    ckpt = load_checkpoint(resolve_checkpoint(source or default_source(bundle_dir)))
    _check_same_model(manifest, card, ckpt.task.name, ckpt.round, ckpt.path.name)
    cfg = RunConfig.from_flower(ckpt.config)
    eval_spec, _ = resolve_data_specs(ckpt.task, eval_data, None, False)
    assert eval_spec is not None
    eval_set = load_prepared(eval_spec, ckpt.task, label_column=cfg.label_column)
    reference = reference_logits(load_model_from_checkpoint(ckpt), eval_set.x)
    skipped = {str(k): str(v) for k, v in (card.get("skipped") or {}).items()}
    outcome = validate_and_record(
        bundle_dir, private_key, eval_set, reference,
        order=[Path(a.file).name for a in manifest.artifacts], skipped=skipped,
        max_accuracy_drop=max_accuracy_drop, eval_spec=eval_spec, out_dir=bundle_dir,
    )  # fmt: skip
    report = ExportReport(
        None, outcome.rows, skipped, outcome.failed, manifest.version,
        validation_path=outcome.validation_path,
    )  # fmt: skip
    if outcome.manifest is None:
        raise ArtifactsFailed(
            outcome.message.replace("no bundle was written", f"{bundle_dir} was left as it was"),
            report,
        )
    report.bundle_dir, report.bundle_id = bundle_dir, outcome.manifest.bundle_id
    if outcome.failed:
        raise ArtifactsFailed(outcome.message, report)
    return report


def _check_same_model(
    manifest: bundle.Manifest, card: Mapping[str, object], task: str, round: int, name: str
) -> None:
    """Refuse a reference model other than the one the bundle's card says it came from."""
    source = card.get("source")
    source = source if isinstance(source, dict) else {}
    problems = []
    if manifest.task.name != task:
        problems.append(f"task {task!r} is not the bundle's {manifest.task.name!r}")
    if source.get("round") not in (None, round):
        problems.append(f"round {round} is not the bundle's {source['round']}")
    if source.get("checkpoint") not in (None, name):
        problems.append(f"checkpoint {name} is not the bundle's {source['checkpoint']}")
    if problems:
        raise ConfigError(
            "the model given is not the one the bundle was exported from: " + "; ".join(problems),
            hint="pass --model with the run directory or checkpoint the bundle came from",
        )
