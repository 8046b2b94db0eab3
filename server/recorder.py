"""Flower's legacy round hooks mapped onto ``ServerRun``'s round loop, around any strategy.

Flower's ``DefaultWorkflow`` (needed for SecAgg+, which exists only in the
legacy API) calls, per round: ``configure_fit`` -> [fit workflow] ->
``aggregate_fit`` -> ``evaluate`` -> ``configure_evaluate`` ->
``aggregate_evaluate`` -> [the evaluate workflow returns]. Each hook here makes
exactly one call into fedge's loop, so a round is, in this one order:

=====================  ==========================================================
Flower calls           fedge step
=====================  ==========================================================
``configure_fit``      ``open_round``: budget check, the round's record opens
``aggregate_fit``      inner aggregation, then ``commit_round``: model + checkpoint
``evaluate``           inner ``evaluate_fn`` (``ServerRun.evaluate``, pure), then
                       ``record_server_eval``
``aggregate_evaluate`` ``record_federated_eval``
end of evaluate wf.    ``close_round``: the metrics line (``closing_evaluate``)
=====================  ==========================================================

Every decision (sampling, aggregation, DP) stays with the wrapped strategy.
"""

import logging
from collections.abc import Callable
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
from fedge.server.strategies import NOT_AGGREGATED
from fedge.shared.ml.training import Metrics

log = logging.getLogger(__name__)
Workflow = Callable[[Any, Any], None]


def _failure_reason(failure: tuple[ClientProxy, Any] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    proxy, res = failure
    status = getattr(res, "status", None)
    return f"node {proxy.node_id}: {getattr(status, 'message', 'failed')}"


def as_flower_result(metrics: Metrics | None) -> tuple[float, dict[str, Scalar]] | None:
    """``ServerRun.evaluate``'s result in the shape of Flower's ``evaluate_fn``."""
    return None if metrics is None else (metrics.loss, {"accuracy": metrics.accuracy})


def _as_metrics(result: tuple[float, dict[str, Scalar]] | None) -> Metrics | None:
    if result is None or "accuracy" not in result[1]:
        return None
    return Metrics(loss=float(result[0]), accuracy=float(result[1]["accuracy"]), num_examples=0)


def closing_evaluate(evaluate_workflow: Workflow, run: ServerRun) -> Workflow:
    """Flower's evaluate workflow, then ``close_round``: the last step of every round.

    ``DefaultWorkflow`` calls its evaluate workflow once per round, after the
    centralized evaluation, whether or not sites evaluate; closing here is the
    one place a round is recorded.
    """

    def evaluate_then_close(grid: Any, context: Any) -> None:
        evaluate_workflow(grid, context)
        run.close_round()

    return evaluate_then_close


class RecordingStrategy(Strategy):
    """Delegates to ``inner``; drives ``run``'s round loop from Flower's hooks."""

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
        if not self.run.open_round(server_round, len(planned), available):
            return []
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
        if not results:
            # Nothing to aggregate: keep the global model as it is.
            self.run.commit_round(clients, reasons, None)
            return None, {}
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if parameters is None:
            # Flower's DP wrappers drop a round with any failure: its accounting assumes
            # the sampled number of sites. Say so instead of silently keeping the model.
            reason = str(metrics.get(NOT_AGGREGATED, "")) if metrics else ""
            self.run.commit_round(clients, reasons, None, aggregated=False, reason=reason)
            return None, metrics
        parameters = self._as_model_dtypes(parameters)
        self.run.commit_round(clients, reasons, parameters_to_ndarrays(parameters))
        return parameters, metrics

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

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0:
            result = self.inner.evaluate(0, parameters)
            self.run.record_initial(_as_metrics(result))
            return result
        if not self.run.round_open:
            return None  # the round was skipped (budget stop): nothing new to evaluate
        if not self.run.round_committed:
            # The fit workflow ended without aggregate_fit: Flower cancels a round in
            # which no site could be sampled, and SecAgg+ halts one that falls below
            # its reconstruction threshold. The model stays; the round is still recorded.
            assert self.run.pending is not None
            reason = (
                "no site could be sampled (fewer available than min-clients)"
                if self.run.pending.sampled == 0
                else "the round ended before aggregation (secure aggregation halted)"
            )
            self.run.commit_round([], [reason], None, aggregated=False)
        result = self.inner.evaluate(server_round, parameters)
        self.run.record_server_eval(_as_metrics(result))
        return result

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self.run.round_open:
            return []
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

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
