"""The Flower ServerApp of fedge: Flower glue only; the work is in ``ServerRun``.

Plain and secure runs share everything but the fit workflow: Flower's default
one, or ``SecAggPlusWorkflow`` when the run config asks for secure aggregation.
"""

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.common import Context, Message, Metrics, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

from fedge.server import events
from fedge.server.events import Event
from fedge.server.recorder import RecordingStrategy, as_flower_result, closing_evaluate
from fedge.server.run_state import ServerRun
from fedge.server.strategies import build_strategy
from fedge.shared import records
from fedge.shared.config import RunConfig
from fedge.shared.errors import FedgeError

log = logging.getLogger(__name__)
app = ServerApp()
# How often the ServerApp asks the SuperLink for replies (Flower's Grid: every 3 s).
REPLY_POLL_S = 0.2


def weighted_average(results: list[tuple[int, Metrics]]) -> Metrics:
    """Example-weighted mean of the sites' loss and accuracy."""
    total = sum(n for n, _ in results) or 1
    out: Metrics = {}
    for key in (records.METRIC_LOSS, records.METRIC_ACCURACY):
        values = [(n, m[key]) for n, m in results if key in m]
        if values:
            out[key] = sum(n * float(v) for n, v in values) / total
    return out


class PromptGrid(Grid):
    """Flower's Grid, waiting for replies with a short poll instead of every 3 s.

    Flower's ``send_and_receive`` sleeps 3 s between pulls; a round takes one call
    per stage (SecAgg+: four), so most of a small model's round was spent asleep.
    This uses the Grid's public ``push_messages``/``pull_messages``; every other
    method of the public ``flwr.server.Grid`` is delegated unchanged.
    ``fedge.shared.ml.flower_compat.check_grid_subclass`` fails loudly if Flower's
    Grid grows a method this lacks or its workflows stop calling ``send_and_receive``.
    Each exchange is reported as an ``exchange`` event (the round's stage timings).
    """

    def __init__(self, grid: Grid, interval: float = REPLY_POLL_S) -> None:
        from fedge.shared.ml.flower_compat import check_grid_subclass

        check_grid_subclass(type(self))
        self._grid = grid
        self._interval = interval

    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Any:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        started = time.time()
        pending = set(self._grid.push_messages(messages))
        pushed = time.time()
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        arrivals: dict[str, float] = {}
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self._grid.pull_messages(pending))
            replies += received
            for reply in received:
                arrivals[str(reply.metadata.src_node_id)] = time.time()
            pending -= {m.metadata.reply_to_message_id for m in received}
            if pending:
                time.sleep(self._interval)
        kinds = sorted({m.metadata.message_type for m in messages})
        events.emit(
            events.Event.EXCHANGE,
            poll="prompt",
            interval=self._interval,
            type="+".join(kinds),
            started=started,
            pushed=pushed,
            replies=arrivals,
        )
        return replies


def run_federation(grid: Grid, context: Context) -> dict[str, Any]:
    """Run the configured number of rounds (or what is left after a resume), or an artifact job."""
    cfg = RunConfig.from_flower(dict(context.run_config))
    if cfg.job == "artifacts":
        # Export's federated job on staged artifacts (``fedge.server.artifact_job``).
        from fedge.server.artifact_job import run_artifact_job

        return run_artifact_job(PromptGrid(grid), context, cfg)
    run = ServerRun(cfg)
    if run.remaining_rounds > 0:

        def evaluate_fn(_round: int, arrays: Any, _config: dict[str, Any]) -> Any:
            return as_flower_result(run.evaluate(arrays))

        strategy = build_strategy(
            cfg,
            initial_parameters=ndarrays_to_parameters(run.global_arrays()),
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=run.fit_config,
            fit_metrics_aggregation_fn=weighted_average,
            evaluate_metrics_aggregation_fn=weighted_average,
            num_sampled_clients=cfg.min_clients,
        )
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=run.remaining_rounds),
            strategy=RecordingStrategy(strategy, run),
        )
        fit_workflow = None
        if cfg.privacy.secagg:
            fit_workflow = SecAggPlusWorkflow(
                num_shares=cfg.privacy.secagg_num_shares,
                reconstruction_threshold=cfg.privacy.secagg_threshold,
                clipping_range=cfg.privacy.secagg_clipping_range,
                quantization_range=cfg.privacy.secagg_quantization_range,
                timeout=cfg.privacy.secagg_timeout,
            )
        workflow = DefaultWorkflow(fit_workflow=fit_workflow)
        # The evaluate workflow is the last thing DefaultWorkflow runs in a round: close there.
        workflow.evaluate_workflow = closing_evaluate(workflow.evaluate_workflow, run)
        workflow(PromptGrid(grid), legacy)
    return run.finish()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedge.shared.ml.flower_compat import shorten_object_pull_backoff

    try:
        # A reply is announced before all its objects are in the SuperLink: the Grid pulls
        # them again within the reply poll, not after Flower's 1 s (this process only).
        shorten_object_pull_backoff(REPLY_POLL_S, "serverapp")
        run_federation(grid, context)
    except FedgeError as e:
        # The user's mistake (a missing weights file, a run dir in use, ...): tell
        # `fedge run` in one line rather than leaving it a traceback in the run log.
        events.emit(Event.ERROR, message=str(e), hint=e.hint)
        raise
