"""ServerRun and RecordingStrategy driven directly, without Flower processes."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedge.server.privacy import site_level_epsilon
from fedge.server.recorder import RecordingStrategy
from fedge.server.run_state import METRICS_FILE, RUN_CONFIG_FILE, SUMMARY_FILE, ServerRun
from fedge.shared import records
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError
from fedge.shared.ml.checkpoint import FINAL_MODEL, load_checkpoint, round_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_DEVICE", "cpu")


def _cfg(run_dir: Path, **changes: Any) -> RunConfig:
    return RunConfig(
        task="digits", model="cnn", num_rounds=4, run_dir=str(run_dir), federated_eval=False
    ).replace(**changes)


def _client(site: str, nbytes: int) -> dict[str, Any]:
    return {
        records.METRIC_SITE: site,
        records.METRIC_BYTES_DOWN: nbytes,
        records.METRIC_BYTES_UP: nbytes,
        records.METRIC_LOSS: 1.0,
    }


def _nudged(arrays: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """New global arrays, as an aggregation would produce (fresh memory, same dtypes)."""
    rng = np.random.default_rng(seed)
    return [(a + rng.normal(0, 0.01, a.shape)).astype(a.dtype) for a in arrays]


def _play_round(run: ServerRun, r: int, arrays: list[np.ndarray]) -> tuple[float, dict[str, Any]]:
    run.begin_round(r, sampled=2, available=3)
    nbytes = sum(a.nbytes for a in arrays)
    run.record_fit([_client("a", nbytes), _client("b", nbytes)], [f"node 9: lost in round {r}"])
    result = run.evaluate(r, arrays)
    assert result is not None
    return result


def test_rounds_write_checkpoints_metrics_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run = ServerRun(_cfg(run_dir))
    assert json.loads((run_dir / RUN_CONFIG_FILE).read_text()) == run.cfg.to_flower()
    initial = run.global_arrays()
    assert len(initial) == len(run.keys)
    _, metrics0 = run.evaluate(0, initial)  # type: ignore[misc]
    assert run.initial_accuracy == metrics0["accuracy"]
    assert not round_path(run_dir, 0).exists()  # round 0 is not a checkpoint

    history = [initial]
    results = []
    for r in (1, 2):
        history.append(_nudged(history[-1], r))
        results.append(_play_round(run, r, history[-1]))
        ckpt = load_checkpoint(round_path(run_dir, r))
        assert ckpt.round == r
        for key, value in zip(run.keys, history[-1], strict=True):
            np.testing.assert_array_equal(ckpt.state_dict[key].numpy(), value)
        assert ckpt.metrics["accuracy"] == results[-1][1]["accuracy"]

    rows = read_jsonl(run_dir / METRICS_FILE)
    assert [row["round"] for row in rows] == [1, 2]
    nbytes = sum(a.nbytes for a in initial)
    for row, (loss, metrics) in zip(rows, results, strict=True):
        assert row["bytes_down"] == row["bytes_up"] == 2 * nbytes
        assert row["failures"] == [f"node 9: lost in round {row['round']}"]
        assert (row["sampled"], row["available"]) == (2, 3)
        assert row["server_eval"] == {"loss": loss, "accuracy": metrics["accuracy"]}
        assert [c[records.METRIC_SITE] for c in row["clients"]] == ["a", "b"]
        assert row["epsilon"] is None

    summary = run.finish()
    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == summary
    assert not (run_dir / "summary.partial.json").exists()
    final = load_checkpoint(run_dir / FINAL_MODEL)
    assert final.round == 2
    for key, value in zip(run.keys, history[-1], strict=True):
        np.testing.assert_array_equal(final.state_dict[key].numpy(), value)
    assert summary["rounds"] == 2 and summary["rounds_configured"] == 4
    assert summary["clients"] == 2 and summary["sites"] == ["a", "b"]
    assert summary["initial_accuracy"] == metrics0["accuracy"]
    assert summary["final_accuracy"] == pytest.approx(results[-1][1]["accuracy"])
    assert summary["final_loss"] == pytest.approx(results[-1][0])
    assert summary["failures"] == 2
    assert summary["bytes_down_total"] == summary["bytes_up_total"] == 4 * nbytes
    assert summary["trainable_fraction"] == 1.0  # full mode: everything travels
    assert summary["stopped"] is None
    assert summary["privacy"]["dp"] == {"level": "none"}
    assert (summary["task"], summary["model"], summary["mode"]) == ("digits", "cnn", "full")

    # Progress reaches `fedge run` as one event line per step.
    events = [
        json.loads(line.removeprefix(records.EVENT_PREFIX))["event"]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith(records.EVENT_PREFIX)
    ]
    assert events.count("round") == 2 and events.count("site-failed") == 2
    assert events[0] == "initial" and events[-1] == "done"


def test_federated_eval_completes_the_round(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "run", federated_eval=True, mode="head"))
    arrays = run.global_arrays()
    assert [a.shape for a in arrays] == [(10, 64), (10,)]
    assert 0 < run.trainable_fraction() < 0.1
    run.begin_round(1, 2, 2)
    run.record_fit([_client("a", 100)], [])
    run.evaluate(1, _nudged(arrays, 1))
    assert read_jsonl(tmp_path / "run" / METRICS_FILE) == []  # waits for the sites' eval
    run.record_federated_eval(0.7, 0.6)
    (row,) = read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert row["federated_eval"] == {"loss": 0.7, "accuracy": 0.6}
    assert row["round"] == 1


def test_second_run_needs_resume_and_resume_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = ServerRun(_cfg(run_dir))
    _, metrics0 = first.evaluate(0, first.global_arrays())  # type: ignore[misc]
    arrays = first.global_arrays()
    for r in (1, 2):
        arrays = _nudged(arrays, r)
        _play_round(first, r, arrays)
    # No finish(): the server died after round 2.

    with pytest.raises(RunError, match="already holds a run; resume it or use another"):
        ServerRun(_cfg(run_dir))

    resumed = ServerRun(_cfg(run_dir, resume=True))
    assert resumed.start_round == 2 and resumed.remaining_rounds == 2
    assert resumed.initial_accuracy == metrics0["accuracy"]
    for key, value in zip(resumed.keys, resumed.global_arrays(), strict=True):
        np.testing.assert_array_equal(value, dict(zip(first.keys, arrays, strict=True))[key])
    assert resumed.fit_config(1) == {records.CFG_SERVER_ROUND: 3}
    resumed.evaluate(0, resumed.global_arrays())
    assert resumed.initial_accuracy == metrics0["accuracy"]  # not the resumed model's
    _play_round(resumed, 1, _nudged(arrays, 3))
    assert load_checkpoint(round_path(run_dir, 3)).round == 3
    summary = resumed.finish()
    assert summary["rounds"] == 3
    assert [row["round"] for row in read_jsonl(run_dir / METRICS_FILE)] == [1, 2, 3]
    assert load_checkpoint(run_dir / FINAL_MODEL).round == 3


def test_resume_with_another_model_is_a_run_error(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = ServerRun(_cfg(run_dir, model="mlp"))
    _play_round(first, 1, _nudged(first.global_arrays(), 1))
    with pytest.raises(RunError, match="does not fit"):
        ServerRun(_cfg(run_dir, model="cnn", resume=True))


# --- RecordingStrategy ------------------------------------------------------------------------


class FakeProxy(ClientProxy):
    """A connected site that is never called: the strategy only samples and configures."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _never(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the strategy must not call sites itself")

    get_properties = get_parameters = fit = evaluate = reconnect = _never


def _strategy(run: ServerRun, fraction_evaluate: float = 0.0) -> RecordingStrategy:
    def evaluate_fn(server_round: int, arrays: Any, _config: dict[str, Any]) -> Any:
        return run.evaluate(server_round, arrays)

    inner = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=fraction_evaluate,
        min_fit_clients=2,
        min_evaluate_clients=0,
        min_available_clients=2,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=run.fit_config,
        accept_failures=True,
        initial_parameters=ndarrays_to_parameters(run.global_arrays()),
    )
    return RecordingStrategy(inner, run)


def _manager(n: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for i in range(n):
        assert manager.register(FakeProxy(i + 1))
    return manager


def _fit_res(arrays: list[np.ndarray], site: str, n: int) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(arrays),
        num_examples=n,
        metrics={records.METRIC_SITE: site, records.METRIC_BYTES_UP: 8},
    )


def test_site_level_budget_stops_the_run(tmp_path: Path) -> None:
    sigma, delta = 1.0, 1e-5
    eps = [site_level_epsilon(sigma, 1.0, r, delta) for r in (1, 2)]  # 3 of 3 sites: q = 1
    budget = (eps[0] + eps[1]) / 2
    cfg = _cfg(tmp_path / "run").replace(
        privacy={"dp": "site", "noise_multiplier": sigma, "epsilon_budget": budget}
    )
    run = ServerRun(cfg)
    strategy = _strategy(run)
    manager = _manager(3)
    params = strategy.initialize_parameters(manager)
    assert params is not None
    strategy.evaluate(0, params)

    planned = strategy.configure_fit(1, params, manager)
    assert len(planned) == 3
    assert planned[0][1].config == {records.CFG_SERVER_ROUND: 1}
    assert run.pending is not None and (run.pending.sampled, run.pending.available) == (3, 3)
    # Two sites answer with float64 arrays (as SecAgg+ dequantizes), one times out.
    arrays64 = [a.astype(np.float64) + 0.01 for a in run.global_arrays()]
    results = [(planned[i][0], _fit_res(arrays64, f"s{i}", 10 * (i + 1))) for i in range(2)]
    aggregated, _ = strategy.aggregate_fit(1, results, [TimeoutError("site s2 timed out")])
    assert aggregated is not None
    out = parameters_to_ndarrays(aggregated)
    assert [a.dtype for a in out] == [np.float32] * len(out)
    np.testing.assert_allclose(out[0], arrays64[0], rtol=1e-6)
    assert run.pending.failures == ["site s2 timed out"]
    assert [c["num_examples"] for c in run.pending.clients] == [10, 20]
    assert run.epsilon == pytest.approx(eps[0])
    strategy.evaluate(1, aggregated)
    assert strategy.configure_evaluate(1, aggregated, manager) == []  # closes the round
    assert run.pending is None

    # Round 2 would take epsilon past the budget: no site is asked to train.
    assert strategy.configure_fit(2, aggregated, manager) == []
    assert "stopped before round 2" in run.stopped_reason
    assert f"{eps[1]:.2f}" in run.stopped_reason and f"{budget:g}" in run.stopped_reason
    assert run.budget_allows(3, 3, 3) is False  # stays stopped
    assert strategy.evaluate(2, aggregated) is None
    assert strategy.configure_evaluate(2, aggregated, manager) == []

    summary = run.finish()
    assert summary["rounds"] == 1
    assert summary["stopped"] == run.stopped_reason
    dp = summary["privacy"]["dp"]
    assert dp["level"] == "site" and dp["epsilon"] == pytest.approx(eps[0])
    assert dp["epsilon"] <= budget
    assert (dp["clients_sampled_per_round"], dp["clients_total"]) == (3, 3)
    (row,) = read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert row["epsilon"] == pytest.approx(eps[0])


def test_budget_allows_without_dp_or_budget(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "a").replace(privacy={"epsilon_budget": 0.1}))
    assert run.budget_allows(50, 3, 3) and not run.stopped_reason  # dp none: no budget
    site = ServerRun(_cfg(tmp_path / "b").replace(privacy={"dp": "site"}))
    assert site.budget_allows(50, 3, 3)  # budget 0: none


def test_record_level_budget_uses_the_sites_next_epsilon(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run").replace(privacy={"dp": "record", "epsilon_budget": 2.0})
    run = ServerRun(cfg)
    run.begin_round(1, 2, 2)
    run.record_fit(
        [
            {
                records.METRIC_SITE: "a",
                records.METRIC_EPSILON: 1.2,
                records.METRIC_EPSILON_NEXT: 1.8,
            },
            {
                records.METRIC_SITE: "b",
                records.METRIC_EPSILON: 1.5,
                records.METRIC_EPSILON_NEXT: 2.1,
            },
        ],
        [],
    )
    assert run.epsilon == 1.5  # the largest site epsilon
    assert run.budget_allows(2, 2, 2) is False
    assert "2.10" in run.stopped_reason


def test_as_model_dtypes_casts_float64_back(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "run", server_eval=False))
    strategy = _strategy(run)
    wide = [a.astype(np.float64) for a in run.global_arrays()]
    narrow = parameters_to_ndarrays(strategy._as_model_dtypes(ndarrays_to_parameters(wide)))
    assert [a.dtype for a in narrow] == [a.dtype for a in run.global_arrays()]
    assert all(a.dtype == np.float32 for a in narrow)
    for a, b in zip(narrow, wide, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    as_bytes = sum(len(t) for t in ndarrays_to_parameters(narrow).tensors)
    assert as_bytes < 0.6 * sum(len(t) for t in ndarrays_to_parameters(wide).tensors)
    assert isinstance(strategy._as_model_dtypes(ndarrays_to_parameters(wide)), Parameters)
    assert torch.get_default_dtype() == torch.float32


def test_a_round_the_strategy_does_not_aggregate_is_recorded(tmp_path: Path) -> None:
    """Flower's DP wrappers return no parameters for a round with a failure: say so."""

    run = ServerRun(RunConfig(run_dir=str(tmp_path / "run"), server_eval=False))

    class KeepsModel(FedAvg):
        def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            return None, {}

    strategy = RecordingStrategy(KeepsModel(), run)
    run.begin_round(1, 2, 2)
    proxy = FakeProxy(1)
    fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(run.global_arrays()), 10, {})
    assert strategy.aggregate_fit(1, [(proxy, fit)], [RuntimeError("x")]) == (None, {})
    assert run.pending is not None and run.pending.aggregated is False
