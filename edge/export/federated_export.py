"""``fedge export --federated``: calibrate and validate through the run's sites, then sign.

The coordinator holds no data. Static int8 is calibrated with histograms the sites sum
(two passes per format: bins fixed from the fp32 model alone, then refined from the first
pass's sums; ``fedge.shared.activation_histograms``) and quantized from the derived ranges
(``fedge.edge.export.federated_quantize``: ONNX QDQ and TFLite ``static_wi8_ai8``); every
candidate artifact is then evaluated by the sites on their held-out data
(``fedge.edge.export.federated``). The gate (``fedge.edge.export.federated_gate``)
decides, and only passing artifacts are recorded and signed; failed ones are named in the
model card under ``failed_validation``.
"""

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fedge.edge.export import bundle_writer
from fedge.edge.export import validate as validate_mod
from fedge.edge.export.federated import (
    FederatedEvaluation,
    FederatedTarget,
    evaluate_artifacts,
    one_export_at_a_time,
    site_histograms_sum,
)
from fedge.edge.export.federated_gate import gate, probe_inputs, probe_logits
from fedge.edge.export.model_card import validation_card
from fedge.shared import bundle, signing
from fedge.shared.config import RunConfig
from fedge.shared.tasks import TaskSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedSource:
    """The run being exported: its config, its directory here, its checkpoint file."""

    cfg: RunConfig
    run_dir: Path
    checkpoint: Path


Quantizer = Callable[[Path, Path], Path]


def federated_static_quantizers(
    source: FederatedSource,
    target: FederatedTarget,
    classes: int,
    say: Callable[[str], None] = log.info,
    cpu_target: str = "x86-64",
    releases: list[dict[str, Any]] | None = None,
) -> tuple[Quantizer | None, Quantizer | None]:
    """``(onnx, tflite)`` quantizers ``(fp32, out) -> out`` calibrated through the sites.

    fedcalib's ``federated_static_quantizer`` runs both histogram passes through
    ``sum_at_sites``, here one artifact job each (``site_histograms_sum``); each noisy
    release's DP record is appended to ``releases``.
    """
    from fedge.edge.export.federated_quantize import federated_static_quantizer

    def sum_at_sites(model: bytes, fmt: str, spec: Any) -> np.ndarray:
        say(f"federated calibration of {fmt}, {spec.kind} pass: {spec.total_bins} bins")
        return site_histograms_sum(source.cfg, source.run_dir, target, model=model, fmt=fmt,
                                   spec=spec, classes=classes, releases=releases)  # fmt: skip

    return (
        federated_static_quantizer("onnx", sum_at_sites, target=cpu_target),
        federated_static_quantizer("tflite", sum_at_sites),
    )


def composed_privacy(releases: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The export's DP on counts: every Gaussian release composed (RDP), or None without noise.

    Calibration's two histogram sums and the evaluation's sums are three releases about the
    same records; their epsilons compose.
    """
    if not releases:
        return None
    import dp_accounting

    delta = float(releases[0]["delta"])
    accountant = dp_accounting.rdp.RdpAccountant()
    for release in releases:
        accountant.compose(dp_accounting.GaussianDpEvent(float(release["noise_multiplier"])))
    return {
        "releases": releases,
        "epsilon": float(accountant.get_epsilon(delta)),
        "delta": delta,
        "accountant": "rdp",
        "scope": "what the export published (model card); the coordinator saw the sums",
    }


def validate_federated(
    staged: Path,
    model: nn.Module,
    source: FederatedSource,
    target: FederatedTarget,
    *,
    max_accuracy_drop: float,
) -> tuple[list[validate_mod.ValidationResult], FederatedEvaluation, np.ndarray, np.ndarray]:
    """Evaluate every artifact of the unvalidated bundle ``staged`` at the sites, and gate.

    Returns the results, the evaluation, and the probe inputs and PyTorch's probe logits
    (the bundle's self-test).
    """
    manifest = bundle.read_manifest(staged)
    artifacts = {Path(a.file).name: (staged / a.file).read_bytes() for a in manifest.artifacts}
    evaluation = evaluate_artifacts(
        source.cfg, source.run_dir, target,
        manifest=(staged / bundle.MANIFEST).read_bytes(),
        checkpoint=source.checkpoint.read_bytes(), artifacts=artifacts,
        classes=len(manifest.labels),
    )  # fmt: skip
    x = probe_inputs(manifest.task, bundle_writer.SELF_TEST_EXAMPLES)
    reference = validate_mod.reference_logits(model.eval().cpu(), x)
    results = gate(
        manifest, evaluation.sums, probe_logits(staged, manifest, x), reference,
        max_accuracy_drop=max_accuracy_drop,
    )  # fmt: skip
    return results, evaluation, x, reference


def export_federated(
    model: nn.Module,
    task: TaskSpec,
    out_dir: Path,
    *,
    source: FederatedSource,
    target: FederatedTarget,
    private_key: signing.Ed25519PrivateKey,
    version: str,
    formats: Sequence[str],
    quantize: Sequence[str],
    max_accuracy_drop: float,
    model_card: Mapping[str, Any] | None,
    privacy: Mapping[str, Any] | None,
    progress: bool = True,
    force: bool = False,
    cpu_target: str = "x86-64",
    console: Any = None,
    static_tflite: bool = True,
) -> Any:
    """Export, calibrate and validate through the sites, record, sign, move into place.

    ``static_tflite`` false leaves out ``model-int8-static.tflite`` (its two calibration
    jobs): the demo does, to stay short.

    Returns
    -------
    ExportReport
        As ``fedge.edge.export.pipeline.export_model``; ``note`` holds the statement
        "evaluated at K sites on N examples (federated)".

    Raises
    ------
    ArtifactsFailed
        Some artifacts failed the federated gate (left out, named in the card) or none
        passed (no bundle); ``.report`` has the table.
    ConnectionFailed, SecurityError, RunError
        The server or the sites could not do the job.
    """
    from fedge.edge.export.pipeline import (
        ArtifactsFailed,
        ExportReport,
        _progress,
        check_choices,
        export,
        plan_artifacts,
    )
    from fedge.shared.errors import ConnectionFailed
    from fedge.shared.processes import port_open, split_address

    check_choices(formats, quantize)
    out_dir = Path(out_dir)
    bundle_writer.check_destination(out_dir, force)
    host, port = split_address(target.superlink)
    if not port_open(host, port, timeout=3.0):  # before minutes of conversion, not after
        raise ConnectionFailed(
            f"cannot reach the server at {target.superlink} to evaluate at the sites",
            hint="pass --server HOST:PORT of the run's SuperLink, or --central with "
            "--eval-data/--calibration",
        )
    plans, _ = plan_artifacts(formats, quantize, static_tflite=static_tflite)
    classes = len(task.classes)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with (
        one_export_at_a_time(source.run_dir),
        tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=out_dir.parent) as tmp,
    ):
        staged = Path(tmp) / out_dir.name
        with _progress(progress, len(plans) + 2, console) as step:
            say = console.print if console is not None else log.info
            releases: list[dict[str, Any]] = []
            onnx_static, tflite_static = federated_static_quantizers(
                source, target, classes, say, cpu_target, releases
            )
            exported = export(
                model, task, staged, private_key=private_key, version=version,
                formats=formats, quantize=quantize, model_card=model_card, privacy=privacy,
                step=step, target=cpu_target, static_quantizer=onnx_static,
                static_tflite_quantizer=tflite_static if static_tflite else None,
            )  # fmt: skip
            with step("evaluate at the sites"):
                results, evaluation, x, reference = validate_federated(
                    staged, model, source, target, max_accuracy_drop=max_accuracy_drop
                )
        by_name = {r.artifact: r for r in results}
        rows = validate_mod.table_rows(exported.order, by_name, exported.skipped)
        failed = [r.artifact for r in results if not r.passed]
        report = ExportReport(None, rows, exported.skipped, failed, version)
        report.note = evaluation.statement()
        report.validation_path = validate_mod.write_validation_file(out_dir, rows)
        if len(failed) == len(results):
            detail = "; ".join(f"{r.artifact} ({r.reason})" for r in results)
            raise ArtifactsFailed(f"no artifact passed federated validation: {detail}", report)
        card = validation_card(
            rows, failed, eval_spec=None, eval_examples=evaluation.sums.examples,
            max_accuracy_drop=max_accuracy_drop,
        )  # fmt: skip
        card["validation_data"]["eval_data"] = evaluation.statement()
        card["validation_data"]["federated"] = evaluation.card()
        if evaluation.dp.get("mechanism"):
            releases.append(evaluation.dp)
        card["validation_data"]["federated"]["count_noise"] = composed_privacy(releases)
        card["validation_data"]["probe"] = "synthetic standard-normal inputs (no data)"
        bundle_writer.record_validation(
            staged, results, self_test_inputs=x,
            self_test_labels=[int(v) for v in reference.argmax(1)], card_updates=card,
            private_key=private_key,
        )  # fmt: skip
        bundle_writer.replace_dir(staged, out_dir)
    report.bundle_dir, report.bundle_id = out_dir, bundle.read_manifest(out_dir).bundle_id
    report.federated = evaluation
    if failed:
        detail = ", ".join(f"{n} ({by_name[n].reason})" for n in failed)
        raise ArtifactsFailed(
            f"left out of bundle {out_dir}: they failed federated validation: {detail}", report
        )
    return report
