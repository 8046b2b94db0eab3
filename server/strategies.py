"""Choose and configure one of Flower's strategies for a run (FedAvg, FedProx, FedAdam).

fedge runs every federation through Flower's legacy workflow (``LegacyContext``
+ ``DefaultWorkflow``) because SecAgg+ exists only there in flwr 1.42; using it
for plain runs too keeps one server path for both. Site-level DP wraps the
chosen strategy in Flower's own ``DifferentialPrivacyClientSideFixedClipping``.
"""

from collections.abc import Callable
from typing import Any

from flwr.common import MetricsAggregationFn, Parameters
from flwr.server.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from fedge.shared.config import RunConfig

EvaluateFn = Callable[[int, Any, dict[str, Any]], tuple[float, dict[str, Any]] | None]


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
    else:
        strategy = FedAvg(**common)
    if cfg.privacy.dp == "site":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=cfg.privacy.noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=num_sampled_clients,
        )
    return strategy
