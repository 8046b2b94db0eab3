"""The server's round loop through its public entry, ``run_federation``, on Flower's real workflow.

Flower's ``DefaultWorkflow`` drives the run as it does under a SuperLink; only
the Grid is fake: in-process sites that answer Flower's train and evaluate
messages. The sites look at the run directory when a round's train message
reaches them, so a change in the order aggregate -> checkpoint -> evaluate ->
record fails these tests.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedge.server.app import run_federation
from fedge.server.events import Event
from fedge.server.privacy import site_level_epsilon
from fedge.server.recorder import RecordingStrategy
from fedge.server.run_state import (
    METRICS_FILE,
    ROUND_RECORD_FILE,
    RUN_CONFIG_FILE,
    SUMMARY_FILE,
    ServerRun,
)
from fedge.shared import records
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError
from fedge.shared.ml.checkpoint import FINAL_MODEL, load_checkpoint, round_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp process sets at start-up; messages take their IDs from it."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _cfg(run_dir: Path, **changes: Any) -> RunConfig:
    return RunConfig(
        task="digits",
        model="mlp",
        num_rounds=2,
        min_clients=2,
        run_dir=str(run_dir),
        federated_eval=False,
    ).replace(**changes)


class Site:
    """A fake site: moves each received array by ``step`` and reports ``examples``."""

    def __init__(self, name: str, examples: int, step: float, fails: bool = False) -> None:
        self.name, self.examples, self.step, self.fails = name, examples, step, fails

    def fit(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [(a + self.step).astype(a.dtype) for a in arrays]


class FakeGrid(Grid):
    """Flower's Grid with sites answering in-process; it notes what the run dir held."""

    def __init__(self, sites: list[Site], run_dir: Path) -> None:
        self.sites = {i + 1: site for i, site in enumerate(sites)}
        self.run_dir = run_dir
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, list[np.ndarray]]] = []  # (round, global arrays) per train
        self.seen_at_train: dict[int, tuple[bool, list[int]]] = {}
        self._next_id = 0

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        return Run.create_empty(1)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.sites)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._next_id += 1
            # What a SuperLink does on push: give the message its ID.
            msg.metadata.__dict__["_message_id"] = str(self._next_id)
            self.replies[str(self._next_id)] = self._answer(msg)
            ids.append(str(self._next_id))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, msg: Message) -> Message:
        site = self.sites[msg.metadata.dst_node_id]
        if site.fails:
            return Message(Error(code=1, reason=f"site {site.name} crashed"), reply_to=msg)
        metrics = {records.METRIC_SITE: site.name}
        if msg.metadata.message_type == MessageType.TRAIN:
            fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
            arrays = parameters_to_ndarrays(fit_ins.parameters)
            server_round = int(fit_ins.config[records.CFG_SERVER_ROUND])
            self.sent.append((server_round, arrays))
            checkpoint = round_path(self.run_dir, server_round - 1)
            lines = [r["round"] for r in read_jsonl(self.run_dir / METRICS_FILE)]
            self.seen_at_train[server_round] = (checkpoint.exists(), lines)
            nbytes = sum(a.nbytes for a in arrays)
            metrics |= {records.METRIC_BYTES_DOWN: nbytes, records.METRIC_BYTES_UP: nbytes}
            update = ndarrays_to_parameters(site.fit(arrays))
            res = FitRes(Status(Code.OK, ""), update, site.examples, metrics)
            return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
        accuracy = 0.5 + site.step
        metrics |= {records.METRIC_ACCURACY: accuracy, records.METRIC_LOSS: 1.0 - accuracy}
        res_eval = EvaluateRes(Status(Code.OK, ""), 1.0 - accuracy, site.examples, metrics)
        return Message(compat.evaluateres_to_recorddict(res_eval), reply_to=msg)


SITES = [Site("a", 10, 0.01), Site("b", 30, -0.02), Site("c", 20, 0.0, fails=True)]


def _run(cfg: RunConfig, sites: list[Site] = SITES) -> tuple[dict[str, Any], FakeGrid]:
    grid = FakeGrid(sites, Path(cfg.run_dir))
    context = Context(1, 0, {}, RecordDict(), dict(cfg.to_flower()))
    return run_federation(grid, context), grid


def _events(out: str) -> list[dict[str, Any]]:
    return [
        json.loads(line.removeprefix(records.EVENT_PREFIX))
        for line in out.splitlines()
        if line.startswith(records.EVENT_PREFIX)
    ]


def _fedavg(arrays: list[np.ndarray], sites: list[Site]) -> list[np.ndarray]:
    ok = [s for s in sites if not s.fails]
    total = sum(s.examples for s in ok)
    return [sum(s.examples * s.fit([a])[0].astype(np.float64) for s in ok) / total for a in arrays]


def test_each_round_aggregates_checkpoints_evaluates_then_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path / "run")
    summary, grid = _run(cfg)
    run_dir = Path(cfg.run_dir)
    assert json.loads((run_dir / RUN_CONFIG_FILE).read_text()) == cfg.to_flower()

    # Each train message found the previous round checkpointed AND recorded: the
    # metrics line is written before the next round, the checkpoint before the line.
    assert sorted(grid.seen_at_train) == [1, 2]
    assert grid.seen_at_train[1] == (False, [])
    assert grid.seen_at_train[2] == (True, [1])

    reference = ServerRun(cfg.replace(run_dir=str(tmp_path / "reference")))
    rows = read_jsonl(run_dir / METRICS_FILE)
    assert [row["round"] for row in rows] == [1, 2]
    for row in rows:
        r = row["round"]
        sent = next(arrays for rnd, arrays in grid.sent if rnd == r)
        ckpt = load_checkpoint(round_path(run_dir, r))
        assert ckpt.round == r
        # aggregate -> checkpoint: the round's checkpoint is the FedAvg of the answers,
        # cast back to the model's dtypes, and it is what the next round sends.
        expected = _fedavg(sent, SITES)
        for key, value in zip(reference.keys, expected, strict=True):
            assert ckpt.state_dict[key].dtype == torch.float32
            np.testing.assert_allclose(ckpt.state_dict[key].numpy(), value, rtol=1e-5, atol=1e-6)
        later = [arrays for rnd, arrays in grid.sent if rnd == r + 1]
        for key, value in zip(reference.keys, later[0] if later else [], strict=False):
            np.testing.assert_array_equal(value, ckpt.state_dict[key].numpy())
        # checkpoint -> evaluate -> record: the line holds the checkpoint's evaluation.
        arrays = [ckpt.state_dict[k].numpy() for k in reference.keys]
        metrics = reference.evaluate(arrays)
        assert metrics is not None
        assert row["server_eval"] == {"loss": metrics.loss, "accuracy": metrics.accuracy}
        assert sorted(c[records.METRIC_SITE] for c in row["clients"]) == ["a", "b"]
        assert len(row["failures"]) == 1 and "site c crashed" in row["failures"][0]
        assert (row["sampled"], row["available"]) == (3, 3)
        nbytes = sum(a.nbytes for a in sent)
        assert row["bytes_down"] == row["bytes_up"] == 2 * nbytes
        assert row["aggregated"] is True and row["epsilon"] is None
        assert row["federated_eval"] == {} and "recovered" not in row

    assert json.loads((run_dir / SUMMARY_FILE).read_text()) == summary
    assert not (run_dir / "summary.partial.json").exists()
    final = load_checkpoint(run_dir / FINAL_MODEL)
    last = load_checkpoint(round_path(run_dir, 2))
    assert final.round == 2
    for key in reference.keys:
        torch.testing.assert_close(final.state_dict[key], last.state_dict[key])
    assert summary["rounds"] == 2 and summary["rounds_configured"] == 2
    assert summary["clients"] == 2 and summary["sites"] == ["a", "b"]
    assert summary["final_accuracy"] == pytest.approx(rows[-1]["server_eval"]["accuracy"])
    assert summary["failures"] == 2 and summary["stopped"] is None
    assert summary["bytes_down_total"] == sum(r["bytes_down"] for r in rows)
    assert summary["trainable_fraction"] == 1.0
    assert summary["privacy"]["dp"] == {"level": "none"}

    seen = [e["event"] for e in _events(capsys.readouterr().out)]
    # Each round's train exchange with the sites is timed by the prompt-polling grid.
    assert seen.count(Event.EXCHANGE) >= 2
    kinds = [kind for kind in seen if kind != Event.EXCHANGE]
    assert kinds == [
        Event.INITIAL,
        *[Event.ROUND_START, Event.SITE_FAILED, Event.ROUND] * 2,
        Event.DONE,
    ]


def test_evaluate_has_no_side_effects(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "run"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    moved = [a + 1.0 for a in run.global_arrays()]
    first, second = run.evaluate(moved), run.evaluate(moved)
    assert first == second and first is not None
    assert first != run.evaluate(run.global_arrays())
    for key, value in run.model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert run.pending is None and run.initial_accuracy is None
    assert read_jsonl(tmp_path / "run" / METRICS_FILE) == []
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_step_out_of_order_is_refused(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "run", server_eval=False))
    with pytest.raises(RuntimeError, match="out of order"):
        run.commit_round([], [], None)  # no round open
    assert run.open_round(1, 2, 2)
    with pytest.raises(RuntimeError, match="out of order"):
        run.record_server_eval(None)  # evaluate before the checkpoint
    run.commit_round([], [], None)
    with pytest.raises(RuntimeError, match="out of order"):
        run.close_round()  # record before evaluate
    with pytest.raises(RuntimeError, match="out of order"):
        run.commit_round([], [], None)  # each step once
    run.record_server_eval(None)
    run.close_round()
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / METRICS_FILE)] == [1]


def test_federated_eval_is_recorded_before_the_round_closes(tmp_path: Path) -> None:
    sites = SITES[:2]
    cfg = _cfg(tmp_path / "run", federated_eval=True, mode="head", num_rounds=1)
    summary, _ = _run(cfg, sites)
    (row,) = read_jsonl(tmp_path / "run" / METRICS_FILE)
    weights = [s.examples for s in sites]
    accuracy = np.average([0.5 + s.step for s in sites], weights=weights)
    assert row["federated_eval"]["accuracy"] == pytest.approx(accuracy)
    assert row["federated_eval"]["loss"] == pytest.approx(1 - accuracy)
    assert row["server_eval"]["accuracy"] == pytest.approx(summary["final_accuracy"])
    assert 0 < summary["trainable_fraction"] < 0.1  # head mode: only the head travels


class _Crash(BaseException):
    """The process dying (SIGKILL) at a chosen point; nothing catches it."""


def test_a_crash_between_checkpoint_and_metrics_line_is_recorded_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path / "run", num_rounds=3)
    run_dir = Path(cfg.run_dir)
    close = ServerRun.close_round

    def crash_in_round_two(self: ServerRun) -> None:
        if self.pending is not None and self.pending.round == 2:
            # Truncated write of the line, then death: the worst case for the file.
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write('{"round": 2, "clie')
            raise _Crash
        close(self)

    with monkeypatch.context() as patch:
        patch.setattr(ServerRun, "close_round", crash_in_round_two)
        with pytest.raises(_Crash):
            _run(cfg)
    assert load_checkpoint(round_path(run_dir, 2)).round == 2
    assert [r["round"] for r in read_jsonl(run_dir / METRICS_FILE)] == [1]
    assert json.loads((run_dir / ROUND_RECORD_FILE).read_text())["round"] == 2
    capsys.readouterr()

    with pytest.raises(RunError, match="already holds a run; resume it or use another"):
        ServerRun(cfg)
    summary, grid = _run(cfg.replace(resume=True))
    rows = read_jsonl(run_dir / METRICS_FILE)
    assert [r["round"] for r in rows] == [1, 2, 3]  # exactly one line per round
    assert summary["rounds"] == 3
    assert sorted(grid.seen_at_train) == [3]  # round 2 was not trained again
    recovered = rows[1]
    assert recovered["recovered"] is True and "recovered" not in rows[0]
    assert sorted(c[records.METRIC_SITE] for c in recovered["clients"]) == ["a", "b"]
    assert recovered["bytes_down"] == rows[0]["bytes_down"] > 0
    ckpt = load_checkpoint(round_path(run_dir, 2))
    reference = ServerRun(cfg.replace(run_dir=str(tmp_path / "reference")))
    metrics = reference.evaluate([ckpt.state_dict[k].numpy() for k in reference.keys])
    assert metrics is not None
    assert recovered["server_eval"] == {"loss": metrics.loss, "accuracy": metrics.accuracy}
    assert summary["failures"] == 3 and summary["bytes_up_total"] == 3 * rows[0]["bytes_up"]
    kinds = [e["event"] for e in _events(capsys.readouterr().out)]
    assert kinds[:3] == [Event.RESUME, Event.ROUND, Event.ROUND_START]


def test_resume_continues_and_keeps_the_initial_accuracy(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run")
    first, _ = _run(cfg)
    summary, grid = _run(cfg.replace(resume=True, num_rounds=3))
    assert [rnd for rnd, _ in grid.sent] == [3, 3]  # the absolute round, to each site
    ckpt = load_checkpoint(round_path(tmp_path / "run", 2))
    keys = ServerRun(cfg.replace(run_dir=str(tmp_path / "reference"))).keys
    for value, key in zip(grid.sent[0][1], keys, strict=True):
        np.testing.assert_array_equal(value, ckpt.state_dict[key].numpy())
    assert summary["rounds"] == 3
    assert summary["initial_accuracy"] == first["initial_accuracy"]  # not the resumed model's
    assert [r["round"] for r in read_jsonl(tmp_path / "run" / METRICS_FILE)] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "run" / FINAL_MODEL).round == 3


def test_resume_with_another_model_is_a_run_error(tmp_path: Path) -> None:
    _run(_cfg(tmp_path / "run", num_rounds=1))
    with pytest.raises(RunError, match="does not fit"):
        ServerRun(_cfg(tmp_path / "run", model="cnn", resume=True))


def test_site_level_dp_drops_a_round_with_a_failure_and_the_budget_stops_the_run(
    tmp_path: Path,
) -> None:
    sigma, delta = 1.0, 1e-5
    eps = [site_level_epsilon(sigma, 1.0, r, delta) for r in (1, 2)]  # 3 of 3 sites: q = 1
    budget = (eps[0] + eps[1]) / 2
    privacy = {"dp": "site", "noise_multiplier": sigma, "epsilon_budget": budget}
    cfg = _cfg(tmp_path / "run", min_clients=3, privacy=privacy)
    summary, grid = _run(cfg)
    # Round 2 would take epsilon past the budget: no site was asked to train.
    assert sorted(grid.seen_at_train) == [1]
    assert summary["rounds"] == 1
    assert "stopped before round 2" in summary["stopped"]
    assert f"{eps[1]:.2f}" in summary["stopped"] and f"{budget:g}" in summary["stopped"]
    (row,) = read_jsonl(tmp_path / "run" / METRICS_FILE)
    # Flower's DP wrapper returns no model for a round with a failure: recorded, and the
    # checkpoint is the unchanged global model.
    assert row["aggregated"] is False and row["epsilon"] == pytest.approx(eps[0])
    # 2 updates for noise sized for 3: the reason is in the round's line.
    assert "sized for 3" in row["not_aggregated_reason"]
    ckpt = load_checkpoint(round_path(tmp_path / "run", 1))
    keys = ServerRun(cfg.replace(run_dir=str(tmp_path / "reference"))).keys
    for value, key in zip(grid.sent[0][1], keys, strict=True):
        np.testing.assert_array_equal(value, ckpt.state_dict[key].numpy())
    dp = summary["privacy"]["dp"]
    assert dp["level"] == "site" and dp["epsilon"] == pytest.approx(eps[0])
    assert dp["epsilon"] <= budget
    assert (dp["clients_sampled_per_round"], dp["clients_total"]) == (3, 3)


def test_budget_allows_without_dp_or_budget(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "a").replace(privacy={"epsilon_budget": 0.1}))
    assert run.budget_allows(50, 3, 3) and not run.stopped_reason  # dp none: no budget
    site = ServerRun(_cfg(tmp_path / "b").replace(privacy={"dp": "site"}))
    assert site.budget_allows(50, 3, 3)  # budget 0: none


def test_record_level_budget_uses_the_sites_next_epsilon(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path / "run", server_eval=False)
    run = ServerRun(cfg.replace(privacy={"dp": "record", "epsilon_budget": 2.0}))
    assert run.open_round(1, 2, 2)
    sites = [
        {records.METRIC_SITE: "a", records.METRIC_EPSILON: 1.2, records.METRIC_EPSILON_NEXT: 1.8},
        {records.METRIC_SITE: "b", records.METRIC_EPSILON: 1.5, records.METRIC_EPSILON_NEXT: 2.1},
    ]
    run.commit_round(sites, [], None)
    assert run.epsilon == 1.5  # the largest site epsilon
    run.record_server_eval(None)
    run.close_round()
    assert run.open_round(2, 2, 2) is False
    assert "2.10" in run.stopped_reason
    (row,) = read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert row["epsilon"] == 1.5
    assert load_checkpoint(round_path(tmp_path / "run", 1)).metrics["epsilon"] == 1.5


def test_as_model_dtypes_casts_float64_back(tmp_path: Path) -> None:
    run = ServerRun(_cfg(tmp_path / "run", server_eval=False))
    strategy = RecordingStrategy(FedAvg(), run)
    wide = [a.astype(np.float64) for a in run.global_arrays()]
    narrow = parameters_to_ndarrays(strategy._as_model_dtypes(ndarrays_to_parameters(wide)))
    assert [a.dtype for a in narrow] == [a.dtype for a in run.global_arrays()]
    assert all(a.dtype == np.float32 for a in narrow)
    for a, b in zip(narrow, wide, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    as_bytes = sum(len(t) for t in ndarrays_to_parameters(narrow).tensors)
    assert as_bytes < 0.6 * sum(len(t) for t in ndarrays_to_parameters(wide).tensors)
    assert isinstance(strategy._as_model_dtypes(ndarrays_to_parameters(wide)), Parameters)


def test_a_round_without_aggregate_fit_still_closes_with_a_checkpoint(tmp_path: Path) -> None:
    """Rounds Flower ends without aggregate_fit are still checkpointed and recorded.

    SecAgg+ halts a round below its threshold; Flower cancels one that sampled no site.
    """
    run = ServerRun(_cfg(tmp_path / "run", server_eval=False))
    strategy = RecordingStrategy(FedAvg(), run)
    assert run.open_round(1, 3, 3)
    params = ndarrays_to_parameters(run.global_arrays())
    assert strategy.evaluate(1, params) is None
    run.close_round()
    assert run.open_round(2, 0, 1)  # Flower cancels a round in which no site was sampled
    assert strategy.evaluate(2, params) is None
    run.close_round()
    rows = read_jsonl(tmp_path / "run" / METRICS_FILE)
    assert [(r["round"], r["aggregated"], r["clients"]) for r in rows] == [
        (1, False, []),
        (2, False, []),
    ]
    assert "secure aggregation halted" in rows[0]["failures"][0]
    assert "no site could be sampled" in rows[1]["failures"][0]
    assert load_checkpoint(round_path(tmp_path / "run", 2)).round == 2


def test_site_level_epsilon_composes_every_rounds_own_sampling_rate(tmp_path: Path) -> None:
    """4 of 4 sites in rounds 1-2, then 1 of 4: each round at its own rate, not the last."""
    from opacus.accountants import RDPAccountant

    z, delta = 1.0, 1e-5
    privacy = {"dp": "site", "noise_multiplier": z, "delta": delta}
    cfg = _cfg(tmp_path / "run", num_rounds=3, server_eval=False, privacy=privacy)
    run = ServerRun(cfg)
    for server_round, (sampled, available) in enumerate([(4, 4), (4, 4), (1, 4)], start=1):
        assert run.open_round(server_round, sampled, available)
        run.commit_round([], [], None)
        run.record_server_eval(None)
        run.close_round()
    accountant = RDPAccountant()  # independent: another library's RDP accountant
    accountant.history = [(z, 1.0, 2), (z, 0.25, 1)]
    independent = accountant.get_epsilon(delta)
    assert run.epsilon == pytest.approx(independent, rel=0.02)
    # Composing all three rounds at the last round's rate states epsilon far too low.
    assert run.epsilon > 1.5 * site_level_epsilon(z, 0.25, 3, delta)
    summary = run.finish()
    dp = summary["privacy"]["dp"]
    # The record alone recomputes it: every round's rate, noise and steps.
    recomputed = RDPAccountant()
    recomputed.history = [
        (r["noise_multiplier"], r["sampling_rate"], r["steps"]) for r in dp["per_round"]
    ]
    assert [r["sampling_rate"] for r in dp["per_round"]] == [1.0, 1.0, 0.25]
    assert dp["epsilon"] == pytest.approx(recomputed.get_epsilon(dp["delta"]), rel=0.02)
    # A resumed run goes on from the same list (the checkpoint carries it).
    resumed = ServerRun(cfg.replace(resume=True, num_rounds=4))
    assert resumed.site_rounds == run.site_rounds
    assert resumed.budget_allows(1, 4, 4)
