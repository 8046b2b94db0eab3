"""The ServerApp's artifact job: send staged artifacts to the sites, sum what they count.

A run with ``job = "artifacts"`` goes through fedge's own ServerApp and ClientApp (the
sites' app-trust check sees the same FAB) on the same SuperLink and SuperNodes as
training. It is one Flower fit round driven by ``ArtifactJobStrategy``: the staged payload
(``fedge.shared.artifact_job_dir``) goes to every connected site as the fit's arrays,
each site answers with an encoded count vector (``fedge.client.artifact_job``), and the
strategy decodes the exact integer sums (``fedge.shared.federated_counts``).

With ``privacy.secagg`` the fit round is Flower's ``SecAggPlusWorkflow``, run with the
settings the encoding needs (weight 1, clipping range 8, 2**22 levels): the strategy's
``aggregate_fit`` then receives only the unmasked sum, handed to every result alike. It
records what it received (``aggregation``: results and distinct vectors) so that this
can be checked from outside. With ``privacy.count-noise-multiplier`` z > 0, Gaussian
noise of standard deviation z times the per-record L2 sensitivity is added to the summed
evaluate counts before they are written, and the epsilon of that single Gaussian release
is recorded (RDP accountant, ``fedge.server.privacy``); histogram sums likewise, with the
histograms' own sensitivity. What the coordinator learns is
the sums (noised or not), the number of sites that answered, and which sites failed.
"""

import hashlib
import logging
import math
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedge.server import events
from fedge.server.events import Event
from fedge.shared import artifact_job_dir, records
from fedge.shared import federated_counts as fc
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError

log = logging.getLogger(__name__)
# How long the job waits for its sites to connect before it gives up.
SITES_TIMEOUT_S = 300.0


class ArtifactJobStrategy(Strategy):
    """One fit round: the staged payload to every site, the decoded sums back."""

    def __init__(self, staged: artifact_job_dir.StagedJob, secagg: bool) -> None:
        self.staged = staged
        self.secagg = secagg
        self.sums: np.ndarray | None = None
        self.sites = 0
        self.failures = 0
        self.aggregation: dict[str, Any] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters([])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        wanted = self.staged.min_sites
        if not client_manager.wait_for(wanted, timeout=int(SITES_TIMEOUT_S)):
            raise RunError(
                f"only {client_manager.num_available()} of {wanted} sites are connected",
                hint="start the sites' SuperNodes (`fedge client start`), then export again",
            )
        clients = list(client_manager.all().values())
        fc.check_sites(len(clients))
        ins = FitIns(
            ndarrays_to_parameters(self.staged.payload),
            {records.CFG_ARTIFACT_JOB: self.staged.job.to_json()},
        )
        events.emit(Event.ROUND_START, round=server_round, sites=len(clients), job="artifacts")
        return [(client, ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.failures = len(failures)
        vectors = [parameters_to_ndarrays(res.parameters) for _, res in results]
        digests = {
            hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in v)).hexdigest()
            for v in vectors
        }
        # What this aggregation code was handed: under SecAgg+ one vector, the masked sum.
        self.aggregation = {
            "results": len(results),
            "distinct_vectors": len(digests),
            "weights": sorted({int(res.num_examples) for _, res in results}),
            "metrics_keys": sorted({k for _, res in results for k in res.metrics}),
        }
        if not results:
            return None, {}
        job = self.staged.job
        expected = job.length * job.digits
        for v in vectors:
            if len(v) != 1 or np.asarray(v[0]).size != expected:
                raise RunError("a site answered the artifact job with a vector of the wrong size")
        k = len(results)
        if self.secagg:
            # Every result carries the same aggregate: the example-weighted mean (weights 1).
            total = np.asarray(vectors[0][0], dtype=np.float64) * k
        else:
            total = np.sum([np.asarray(v[0], dtype=np.float64) for v in vectors], axis=0)
        try:
            self.sums = fc.decode_sum(total, job.digits, job.length)
        except ValueError as e:
            raise RunError(f"the sites' summed counts do not decode: {e}") from e
        if job.kind == "evaluate" and int(self.sums[fc.SLOT_SITES]) != k:
            raise RunError(f"{k} sites answered but the sums count {self.sums[fc.SLOT_SITES]}")
        self.sites = k
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


def count_noise(
    job: fc.ArtifactJob, sums: np.ndarray, cfg: RunConfig, seed: int | None = None
) -> tuple[list[float], dict[str, Any]]:
    """The released sums: exact, or with Gaussian noise and the epsilon of that release.

    Evaluate jobs: sensitivity ``fc.evaluation_sensitivity`` (one example at one site).
    Histogram jobs: fedcalib's ``gaussian_noise`` with ``l2_sensitivity(spec)`` (one record;
    ``fedge.shared.activation_histograms``). Either is one Gaussian release, accounted alone;
    the export composes its releases (``fedge.edge.export.federated_export``).
    """
    z = cfg.privacy.count_noise_multiplier
    if z <= 0:
        return [float(v) for v in sums], {"mechanism": None}
    from fedge.server.privacy import site_level_epsilon

    rng = np.random.default_rng(seed)
    if job.kind == "histogram":
        from fedge.shared.activation_histograms import BinSpec, gaussian_noise, l2_sensitivity

        spec = BinSpec.from_json(job.bin_spec)
        sensitivity = l2_sensitivity(spec)
        noisy = gaussian_noise(sums, spec, z, rng).astype(np.float64)
        unit = "one record at one site (add or remove)"
    else:
        sensitivity = fc.evaluation_sensitivity(job)
        noisy = sums.astype(np.float64) + rng.normal(0.0, z * sensitivity, size=sums.shape)
        noisy[fc.SLOT_SITES] = float(sums[fc.SLOT_SITES])  # the number of sites is public
        unit = "one example at one site (add or remove)"
    delta = cfg.privacy.delta
    epsilon = site_level_epsilon(z, 1.0, 1, delta)
    return [float(v) for v in noisy], {
        "mechanism": "gaussian",
        "unit": unit,
        "l2_sensitivity": sensitivity,
        "noise_multiplier": z,
        "sigma": z * sensitivity,
        "delta": delta,
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "accountant": "rdp",
        "releases": 1,
    }


def run_artifact_job(grid: Grid, context: Any, cfg: RunConfig) -> dict[str, Any]:
    """Run the job staged in ``cfg.run_dir``, write its result beside it, and return a summary."""
    from fedge.server.run_paths import confine_run_paths

    # The run folder is the submitter's choice: confined to the server's folders first.
    cfg = confine_run_paths(cfg)
    staged = artifact_job_dir.read_job(cfg.run_dir)
    strategy = ArtifactJobStrategy(staged, cfg.privacy.secagg)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1), strategy=strategy)
    fit_workflow = None
    if cfg.privacy.secagg:
        fit_workflow = SecAggPlusWorkflow(
            num_shares=cfg.privacy.secagg_num_shares,
            reconstruction_threshold=cfg.privacy.secagg_threshold,
            max_weight=fc.MAX_WEIGHT,
            clipping_range=fc.CLIPPING_RANGE,
            quantization_range=fc.QUANTIZATION_RANGE,
            modulus_range=fc.MODULUS_RANGE,
            timeout=cfg.privacy.secagg_timeout,
        )
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    if strategy.sums is None:
        raise RunError(
            f"no site answered the artifact job ({strategy.failures} failed)",
            hint="see the sites' logs (`fedge client start` output) for their reasons",
        )
    released, dp = count_noise(staged.job, strategy.sums, cfg)
    result = {
        "kind": staged.job.kind,
        "job": staged.job.to_json(),
        "sites": strategy.sites,
        "failures": strategy.failures,
        "secagg": cfg.privacy.secagg,
        "sums": released,
        "exact": dp["mechanism"] is None,
        "dp": dp,
        "aggregation": strategy.aggregation,
    }
    path = artifact_job_dir.write_result(cfg.run_dir, result)
    summary = {"job": "artifacts", "kind": staged.job.kind, "sites": strategy.sites,
               "failures": strategy.failures, "result": str(path)}  # fmt: skip
    events.emit(Event.DONE, summary=summary)
    return summary
