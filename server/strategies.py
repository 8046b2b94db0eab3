"""Choose and configure one of Flower's strategies for a run.

FedAvg, FedProx, FedAdam, FedAvgM (server momentum), and Flower's Byzantine-robust
aggregators (FedMedian, FedTrimmedAvg, Krum, MultiKrum as Krum keeping several updates,
Bulyan); the config refuses the robust ones with SecAgg+ and site-level DP
(``RunConfig._robust_errors``), and FedAvgM and FedAdam, whose server state holds
noise-free means, with site-level DP (``RunConfig._server_optimizer_errors``).

fedge runs every federation through Flower's legacy workflow (``LegacyContext``
+ ``DefaultWorkflow``) because SecAgg+ exists only there in flwr 1.42; using it
for plain runs too keeps one server path for both. Site-level DP wraps the
chosen strategy in Flower's own ``DifferentialPrivacyClientSideFixedClipping``.

That wrapper adds noise z*C/m to the aggregate, which is calibrated for an unweighted
mean of m clipped updates (sensitivity C/m). FedAvg weights each update by the site's
self-reported ``num_examples``, so a site holding a fraction w of the examples moves the
mean by up to w*C, and the stated epsilon would not hold (a 90 % site gets an effective
noise multiplier of about z/(0.9*m)). With site-level DP fedge therefore gives every
site the same weight (``EqualSiteWeights``): the mechanism applied is the one the
accountant assumes.

The noise is sized for ``min-clients`` updates. A round that averages fewer (a site that
timed out in SecAgg+ without being counted as failed) would get relatively less noise
than stated, so ``SiteDPFixedClipping`` refuses to aggregate it and says why.
"""

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from flwr.common import FitRes, MetricsAggregationFn, Parameters, Scalar
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)

from fedge.shared.config import ROBUST_STRATEGIES as ROBUST
from fedge.shared.config import RunConfig

log = logging.getLogger(__name__)
# Metric key of a round a strategy declined to aggregate: its value says why.
NOT_AGGREGATED = "fedge-not-aggregated"
EvaluateFn = Callable[[int, Any, dict[str, Any]], tuple[float, dict[str, Any]] | None]


class EqualSiteWeights(Strategy):
    """Delegate to ``inner``, but aggregate every site's update with weight 1.

    Each ``FitRes.num_examples`` is replaced by 1 before ``inner.aggregate_fit``, so
    FedAvg (and FedProx, which aggregates as FedAvg) computes the plain mean of the
    sites' models: the mechanism site-level DP's noise is calibrated for.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def __repr__(self) -> str:
        return f"EqualSiteWeights({self.inner!r})"

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> Any:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        equal = [(proxy, dataclasses.replace(res, num_examples=1)) for proxy, res in results]
        return self.inner.aggregate_fit(server_round, equal, failures)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> Any:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> Any:
        return self.inner.evaluate(server_round, parameters)


class SiteDPFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side-clipping DP wrapper that fails closed on a short round.

    The wrapper adds noise z*C/m with m = ``num_sampled_clients``, the stated epsilon's
    assumption. With fewer than m updates the mean's sensitivity C/n exceeds C/m, so the
    round is not aggregated (the global model stays) and the reason is returned under
    ``NOT_AGGREGATED``, for the run's metrics. More than m updates only add noise.
    """

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if len(results) < self.num_sampled_clients:
            reason = (
                f"site-level DP: {len(results)} update(s) arrived, the noise is sized for "
                f"{self.num_sampled_clients}; the round was not aggregated"
            )
            log.warning("round %d: %s", server_round, reason)
            return None, {NOT_AGGREGATED: reason}
        return super().aggregate_fit(server_round, results, failures)


def build_strategy(
    cfg: RunConfig,
    initial_parameters: Parameters,
    evaluate_fn: EvaluateFn,
    on_fit_config_fn: Callable[[int], dict[str, Any]],
    fit_metrics_aggregation_fn: MetricsAggregationFn,
    evaluate_metrics_aggregation_fn: MetricsAggregationFn,
    num_sampled_clients: int,
) -> Strategy:
    """The run's strategy, wrapped for site-level DP when the config asks for it."""
    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_train,
        "fraction_evaluate": 1.0 if cfg.federated_eval else 0.0,
        "min_fit_clients": cfg.min_clients,
        "min_evaluate_clients": cfg.min_clients if cfg.federated_eval else 0,
        "min_available_clients": cfg.min_clients,
        "evaluate_fn": evaluate_fn,
        "on_fit_config_fn": on_fit_config_fn,
        "on_evaluate_config_fn": on_fit_config_fn,
        "accept_failures": True,
        "initial_parameters": initial_parameters,
        "fit_metrics_aggregation_fn": fit_metrics_aggregation_fn,
        "evaluate_metrics_aggregation_fn": evaluate_metrics_aggregation_fn,
    }
    strategy: Strategy
    if cfg.strategy == "fedprox":
        strategy = FedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedadam":
        strategy = FedAdam(eta=cfg.server_lr, eta_l=cfg.lr, **common)
    elif cfg.strategy == "fedavgm":
        strategy = FedAvgM(
            server_learning_rate=cfg.server_momentum_lr,
            server_momentum=cfg.server_momentum,
            **common,
        )
    elif cfg.strategy in ROBUST:
        strategy = _robust_strategy(cfg, common)
    else:
        strategy = FedAvg(**common)
    if cfg.privacy.dp == "site":
        strategy = SiteDPFixedClipping(
            EqualSiteWeights(strategy),
            noise_multiplier=cfg.privacy.noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=num_sampled_clients,
        )
    return strategy


def _robust_strategy(cfg: RunConfig, common: dict[str, Any]) -> Strategy:
    """Flower's robust aggregators; MultiKrum averages the ``min_clients - f`` best updates."""
    f = cfg.byzantine_sites
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(beta=cfg.trim_fraction, **common)
    if cfg.strategy == "krum":
        return Krum(num_malicious_clients=f, num_clients_to_keep=0, **common)
    if cfg.strategy == "multikrum":
        keep = max(cfg.min_clients - f, 1)
        return Krum(num_malicious_clients=f, num_clients_to_keep=keep, **common)
    # Bulyan picks its candidates with Krum, which needs its own keyword (0: one at a time).
    return Bulyan(num_malicious_clients=f, to_keep=0, **common)
