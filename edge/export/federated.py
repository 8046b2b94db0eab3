"""Export's federated steps: ask the run's sites to evaluate artifacts or count histograms.

Each step stages an artifact job in the run's directory (``fedge.shared.artifact_job_dir``)
and submits a run with ``job = "artifacts"`` through the same path as ``fedge run``
(``fedge.server.submit.submit_run``: ``flwr run`` to the SuperLink, through the
authenticated front with the operator's token). The ServerApp sends the job to the
enrolled sites and writes the summed counts back; this module reads them. The run's own
privacy settings apply: a run trained with SecAgg+ is evaluated with SecAgg+.
"""

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedge.shared import artifact_job_dir
from fedge.shared import federated_counts as fc
from fedge.shared.atomic import exclusive_lock
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError

log = logging.getLogger(__name__)


# ``fedge.server.submit.submit_run``'s signature: (cfg, superlink, root_certificates,
# on_event=..., token=...) -> the run's summary. Passed in: export does not import server.
Submit = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class FederatedTarget:
    """Where the run's sites are reached: the SuperLink, its CA, the operator's token.

    ``submit`` is how a run reaches the SuperLink: ``fedge.server.submit.submit_run``
    (the CLI and the demo pass it; the export side does not import the server).
    """

    superlink: str
    root_certificates: Path | None
    token: str | None
    submit: Submit
    min_sites: int = 0  # 0: the run's min-clients
    secagg: bool | None = None  # None: as the run was trained
    count_noise_multiplier: float = 0.0
    confusion: bool = True
    on_event: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class FederatedEvaluation:
    """The released sums of one federated evaluation, and how they were made."""

    sums: fc.EvaluationSums
    secagg: bool
    exact: bool
    dp: dict[str, Any]
    failures: int
    aggregation: dict[str, Any]

    def statement(self) -> str:
        """The sentence the table and the model card carry."""
        noise = "" if self.exact else ", counts with DP noise"
        return (
            f"evaluated at {self.sums.sites} sites on {self.sums.examples} examples "
            f"(federated{', SecAgg+' if self.secagg else ''}{noise})"
        )

    def card(self) -> dict[str, Any]:
        """The model card's record of the federated evaluation."""
        return {
            "statement": self.statement(),
            "sites": self.sums.sites,
            "examples": self.sums.examples,
            "failed_sites": self.failures,
            "secagg": self.secagg,
            "exact_counts": self.exact,
            "dp": self.dp,
            "what_the_coordinator_saw": "sums over the sites only"
            if self.secagg
            else "each site's counts (no per-example values)",
        }


LOCK_FILE = "federated-export.lock"


def one_export_at_a_time(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the run's export lock, or fail at once if another export holds it.

    Every job of an export is staged in the same ``<run_dir>/federated-export/``; a second
    export of the run started meanwhile would replace the first one's job and result.
    """
    busy = f"another federated export of {run_dir} is running; wait for it to finish"
    return exclusive_lock(Path(run_dir) / LOCK_FILE, busy)


def job_config(cfg: RunConfig, run_dir: Path, target: FederatedTarget) -> RunConfig:
    """The run config of an artifact job on the run in ``run_dir`` (its own settings)."""
    privacy: dict[str, Any] = {"count_noise_multiplier": target.count_noise_multiplier}
    if target.secagg is not None:
        privacy["secagg"] = target.secagg
    return cfg.replace(job="artifacts", run_dir=str(run_dir.resolve()), resume=False,
                       privacy=privacy)  # fmt: skip


def run_job(
    cfg: RunConfig,
    run_dir: Path,
    target: FederatedTarget,
    job: fc.ArtifactJob,
    files: dict[str, bytes],
) -> dict[str, Any]:
    """Stage ``job``, submit it, wait, and return the ServerApp's result.

    Raises
    ------
    ConnectionFailed, SecurityError, RunError
        The server cannot be reached, refuses the credential, or the job fails.
    """
    job_cfg = job_config(cfg, run_dir, target)
    min_sites = target.min_sites or cfg.min_clients
    artifact_job_dir.stage_job(run_dir, job, files, min_sites)
    summary = target.submit(
        job_cfg, target.superlink, target.root_certificates, on_event=target.on_event,
        token=target.token,
    )  # fmt: skip
    if summary.get("job") != "artifacts":
        raise RunError("the server did not run the artifact job (is it the same fedge version?)")
    return artifact_job_dir.read_result(run_dir)


def evaluate_artifacts(
    cfg: RunConfig,
    run_dir: Path,
    target: FederatedTarget,
    *,
    manifest: bytes,
    checkpoint: bytes,
    artifacts: dict[str, bytes],
    classes: int,
) -> FederatedEvaluation:
    """Have the sites run every artifact on their held-out data; the released sums.

    Parameters
    ----------
    cfg, run_dir
        The run the artifacts come from (its config, its directory on this machine).
    target
        The SuperLink and credentials (``FederatedTarget``).
    manifest, checkpoint, artifacts
        The exported bundle's ``manifest.json``, the checkpoint file, and the artifacts by
        base name (the sites check each against the manifest's hash).
    classes
        The model's number of classes.
    """
    confusion = target.confusion and classes <= fc.MAX_CONFUSION_CLASSES
    job = fc.ArtifactJob(
        kind="evaluate", classes=classes, artifacts=tuple(artifacts), confusion=confusion,
        digits=fc.EVALUATE_DIGITS,
    )  # fmt: skip
    files = {"manifest.json": manifest, "model.safetensors": checkpoint, **artifacts}
    result = run_job(cfg, run_dir, target, job, files)
    return read_evaluation(job, result)


def read_evaluation(job: fc.ArtifactJob, result: dict[str, Any]) -> FederatedEvaluation:
    """Parse the ServerApp's result of an evaluate job (noisy counts rounded, at least 0)."""
    try:
        if result.get("job") != job.to_json():
            raise ValueError("the result is for another job")
        raw = np.asarray(result["sums"], dtype=np.float64)
        sums = fc.evaluation_sums(job, np.maximum(np.rint(raw), 0).astype(np.int64))
        evaluation = FederatedEvaluation(
            sums, bool(result["secagg"]), bool(result["exact"]), dict(result["dp"]),
            int(result["failures"]), dict(result["aggregation"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"the artifact job's result is unreadable: {e}") from e
    if evaluation.sums.examples <= 0:
        raise RunError("the sites evaluated no examples")
    return evaluation


def site_histograms_sum(
    cfg: RunConfig,
    run_dir: Path,
    target: FederatedTarget,
    *,
    model: bytes,
    fmt: str,
    spec: Any,
    classes: int,
    releases: list[dict[str, Any]] | None = None,
) -> np.ndarray:
    """The sum over the sites of ``site_histograms(model, fmt, x, spec)``: one calibration pass.

    With ``target.count_noise_multiplier`` the server adds Gaussian noise to the sum
    (``fedge.server.artifact_job.count_noise``); the release's DP record is appended to
    ``releases``.
    """
    job = fc.ArtifactJob(
        kind="histogram", classes=classes, fmt=fmt, bin_spec=spec.to_json(),
        total_bins=int(spec.total_bins), digits=fc.HISTOGRAM_DIGITS,
    )  # fmt: skip
    result = run_job(cfg, run_dir, target, job, {f"model.{fmt}": model})
    try:
        if result.get("job") != job.to_json():
            raise ValueError("the result is for another job")
        sums = np.asarray(result["sums"], dtype=np.float64)
        if sums.shape != (job.length,):
            raise ValueError(f"{sums.shape} sums for {job.length} bins")
        if releases is not None and result["dp"].get("mechanism"):
            releases.append(dict(result["dp"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RunError(f"the histogram job's result is unreadable: {e}") from e
    return np.rint(sums).astype(np.int64)
