"""A strategy wrapper that records each round for ``ServerRun``, around any Flower strategy.

It delegates every decision to the wrapped strategy (FedAvg, FedProx, FedAdam,
optionally inside Flower's DP wrapper) and only observes: who was sampled,
what each site reported, which sites failed, and the privacy budget.
"""

import logging
from typing import Any

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
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedge.server.run_state import ServerRun

log = logging.getLogger(__name__)


def _failure_reason(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    proxy, res = failure
    status = getattr(res, "status", None)
    return f"node {proxy.node_id}: {getattr(status, 'message', 'failed')}"


class RecordingStrategy(Strategy):
    """Delegates to ``inner``; reports rounds, failures and budget stops to ``run``."""

    def __init__(self, inner: Strategy, run: ServerRun) -> None:
        self.inner = inner
        self.run = run

    def __repr__(self) -> str:
        return f"RecordingStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        available = client_manager.num_available()
        planned = self.inner.configure_fit(server_round, parameters, client_manager)
        if not self.run.budget_allows(server_round, len(planned), available):
            return []
        self.run.begin_round(server_round, len(planned), available)
        return planned

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        reasons = [_failure_reason(f) for f in failures]
        for reason in reasons:
            log.warning("round %d: a site failed and was left out: %s", server_round, reason)
        clients = [
            {"node_id": proxy.node_id, "num_examples": res.num_examples, **res.metrics}
            for proxy, res in results
        ]
        self.run.record_fit(clients, reasons)
        if not results:
            # Nothing to aggregate: keep the global model as it is.
            return None, {}
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if parameters is None:
            # Flower's DP wrappers drop a round with any failure: its accounting assumes
            # the sampled number of sites. Say so instead of silently keeping the model.
            self.run.record_not_aggregated()
            return None, metrics
        return self._as_model_dtypes(parameters), metrics

    def _as_model_dtypes(self, parameters: Parameters) -> Parameters:
        """Cast the aggregate back to the model's dtypes.

        SecAgg+ dequantizes to float64; left as is, every later round would
        send twice the bytes and the checkpoints would not match the model.
        """
        arrays = parameters_to_ndarrays(parameters)
        dtypes = [a.dtype for a in self.run.global_arrays()]
        return ndarrays_to_parameters(
            [a.astype(d, copy=False) for a, d in zip(arrays, dtypes, strict=True)]
        )

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if self.run.pending is None:
            return []
        planned = self.inner.configure_evaluate(server_round, parameters, client_manager)
        if not planned:
            self.run.finish_round()
        return planned

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        accuracy = metrics.get("accuracy")
        self.run.record_federated_eval(loss, float(accuracy) if accuracy is not None else None)
        return loss, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round > 0 and self.run.pending is None:
            return None  # the round was skipped (budget stop): nothing new to evaluate
        return self.inner.evaluate(server_round, parameters)
