"""One federated run on the server: run directory, global model, checkpoints, metrics.

``ServerRun`` owns everything the ServerApp writes. Each round is one sequence
of steps, each called once and in this order (the ``RecordingStrategy`` maps
Flower's hooks onto them; see docs/round-loop.md):

``open_round`` -> ``commit_round`` (aggregate -> checkpoint) -> ``evaluate`` (pure)
-> ``record_server_eval`` / ``record_federated_eval`` -> ``close_round`` (metrics line).

A step called out of order raises, so a change in the driver's order cannot
go unnoticed. On resume, a checkpointed round without its metrics line (a crash
between the two writes) is recorded before anything else.
"""

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.server import events
from fedge.server.events import Event
from fedge.server.privacy import composed_epsilon, privacy_record, site_round
from fedge.server.run_paths import confine_run_paths
from fedge.server.superlink import ENV_AUTH, ENV_TLS
from fedge.shared import records
from fedge.shared.atomic import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError
from fedge.shared.ml.checkpoint import (
    FINAL_MODEL,
    latest_checkpoint,
    load_checkpoint,
    round_path,
    save_checkpoint,
)
from fedge.shared.ml.data import load_data, task_for_run
from fedge.shared.ml.device import select_device
from fedge.shared.ml.models import build_run_model, count_parameters, exchanged_keys
from fedge.shared.ml.training import Metrics, evaluate, make_loader
from fedge.shared.preprocess import prepare

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_CONFIG_FILE = "run_config.json"
# The last committed round's record, written just before its checkpoint.
ROUND_RECORD_FILE = "round_record.json"


class _Step(IntEnum):
    """Where the current round is in the loop."""

    CLOSED = 0
    OPEN = 1
    COMMITTED = 2
    EVALUATED = 3


@dataclass
class RoundRecord:
    """What happened in one round, written as one line of metrics.jsonl."""

    round: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)
    federated: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None
    sampled: int = 0
    available: int = 0
    seconds: float = 0.0
    aggregated: bool = True
    not_aggregated_reason: str = ""
    recovered: bool = False

    def to_json(self) -> dict[str, Any]:
        row = {
            "round": self.round,
            "clients": self.clients,
            "failures": self.failures,
            "server_eval": self.server,
            "federated_eval": self.federated,
            "epsilon": self.epsilon,
            "bytes_down": sum(int(c.get(records.METRIC_BYTES_DOWN, 0)) for c in self.clients),
            "bytes_up": sum(int(c.get(records.METRIC_BYTES_UP, 0)) for c in self.clients),
            "sampled": self.sampled,
            "available": self.available,
            "aggregated": self.aggregated,
            "seconds": round(self.seconds, 3),
        }
        if self.not_aggregated_reason:
            row["not_aggregated_reason"] = self.not_aggregated_reason
        if self.recovered:
            # Written on resume after a crash: the sites' own evaluation was lost.
            row["recovered"] = True
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "RoundRecord":
        """The record written by ``to_json`` (totals are recomputed from the clients)."""
        return cls(
            round=int(row["round"]),
            clients=list(row.get("clients", [])),
            failures=[str(f) for f in row.get("failures", [])],
            server=dict(row.get("server_eval", {})),
            federated=dict(row.get("federated_eval", {})),
            epsilon=row.get("epsilon"),
            sampled=int(row.get("sampled", 0)),
            available=int(row.get("available", 0)),
            seconds=float(row.get("seconds", 0.0)),
            aggregated=bool(row.get("aggregated", True)),
            not_aggregated_reason=str(row.get("not_aggregated_reason", "")),
        )


class ServerRun:
    """State and outputs of a run; see the module docstring."""

    def __init__(self, cfg: RunConfig) -> None:
        # Paths the submitter chose stay inside the server's folders (run_paths).
        cfg = confine_run_paths(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).expanduser().resolve()
        self.task = task_for_run(cfg)
        self.device = select_device()
        self.model = build_run_model(cfg, self.task)
        self.keys = exchanged_keys(self.model, cfg.mode)
        self.start_round = 0
        self.initial_accuracy: float | None = None
        self.stopped_reason = ""
        self.pending: RoundRecord | None = None
        self._step = _Step.CLOSED
        self._scratch: torch.nn.Module | None = None
        self.round_started = time.monotonic()
        self.epsilon: float | None = None
        self.epsilon_next_by_site: dict[str, float] = {}
        # Record-level DP: per site, its DP-SGD sample rate, steps per round and rounds, so
        # that anyone can recompute epsilon from the model card alone.
        self.dp_per_site: dict[str, dict[str, float]] = {}
        # Site-level DP: every round's sampling rate and noise (privacy.site_round), composed
        # round by round; kept in each checkpoint so that a resume goes on from them.
        self.site_rounds: list[dict[str, Any]] = []
        self.max_sampled = 0
        self.max_available = 0
        self._eval_loader = self._server_eval_loader()
        self._prepare_run_dir()

    # --- set-up -----------------------------------------------------------------------

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and not self.cfg.resume:
            raise RunError(
                f"run directory {self.run_dir} already holds a run; resume it or use another"
            )
        if latest is not None:
            ckpt = load_checkpoint(latest)
            try:
                self.model.load_state_dict(ckpt.state_dict)
            except RuntimeError as e:  # torch's message lists every key: chain it, say one line
                raise RunError(
                    f"checkpoint {latest} does not fit model {self.cfg.model!r} "
                    f"(mode {self.cfg.mode!r}, dp {self.cfg.privacy.dp!r}) of this config; "
                    "resume with the run's own config (see run_config.json)"
                ) from e
            self.start_round = ckpt.round
            self.epsilon = ckpt.metrics.get("epsilon")
            self.epsilon_next_by_site = dict(ckpt.metrics.get("epsilon_next_by_site", {}))
            self.dp_per_site = dict(ckpt.metrics.get("dp_per_site", {}))
            self.site_rounds = self._saved_site_rounds(ckpt.metrics, ckpt.round)
            summary = self._read_summary()
            self.initial_accuracy = summary.get("initial_accuracy")
            events.emit(Event.RESUME, round=self.start_round, checkpoint=str(latest))
            self._recover(ckpt.round)
        atomic_write_json(self.run_dir / RUN_CONFIG_FILE, self.cfg.to_flower())

    def _recover(self, checkpointed: int) -> None:
        """Make metrics.jsonl hold exactly one line per round up to the last checkpoint.

        A crash between a round's checkpoint and its metrics line (SIGKILL while it
        was evaluated) leaves that round unrecorded; a crash inside a write leaves a
        truncated last line. Rewrite the file with its valid lines (the first per
        round, none past the checkpoint), then record the missing round: its record
        from ``ROUND_RECORD_FILE``, its server-side evaluation recomputed from the
        checkpoint (the model now loaded; evaluation is deterministic).
        """
        path = self.run_dir / METRICS_FILE
        rows: dict[int, dict[str, Any]] = {}
        for row in read_jsonl(path):
            if isinstance(row.get("round"), int) and row["round"] <= checkpointed:
                rows.setdefault(row["round"], row)
        if path.exists():
            text = "".join(json.dumps(rows[r], sort_keys=True) + "\n" for r in sorted(rows))
            atomic_write_text(path, text)
        if checkpointed in rows:
            return
        saved = self._read_json(self.run_dir / ROUND_RECORD_FILE)
        if saved.get("round") == checkpointed:
            record = RoundRecord.from_json(saved)
        else:
            record = RoundRecord(checkpointed)
        record.federated = {}
        record.recovered = True
        metrics = self._evaluate_model()
        if metrics is not None:
            record.server = {"loss": metrics.loss, "accuracy": metrics.accuracy}
        log.warning("round %d was checkpointed but not recorded: recorded it now", checkpointed)
        self._record(record)

    def _saved_site_rounds(
        self, metrics: dict[str, Any], checkpointed: int
    ) -> list[dict[str, Any]]:
        """The per-round site-DP list of a checkpoint; rounds it lacks count at rate 1.

        A checkpoint written before fedge kept the list (or a damaged list) must not
        under-count: each missing round is taken as if every site were sampled (q = 1).
        """
        if self.cfg.privacy.dp != "site":
            return []
        saved = metrics.get("site_rounds")
        rows = [r for r in saved if isinstance(r, dict)] if isinstance(saved, list) else []
        known = {int(r.get("round", 0)) for r in rows}
        z = self.cfg.privacy.noise_multiplier
        missing = [site_round(r, 1, 1, z) for r in range(1, checkpointed + 1) if r not in known]
        return sorted(rows + missing, key=lambda r: int(r.get("round", 0)))

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        try:
            loaded = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def _read_summary(self) -> dict[str, Any]:
        path = self.run_dir / SUMMARY_FILE
        if not path.exists():
            partial = self.run_dir / "summary.partial.json"
            path = partial if partial.exists() else path
        try:
            return dict(json.loads(path.read_text())) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def _server_eval_loader(self) -> Any:
        if not self.cfg.server_eval:
            return None
        spec = self.cfg.eval_data or (
            f"{self.cfg.task}:test" if self.cfg.task in ("digits", "breast-cancer") else ""
        )
        if not spec:
            return None
        raw = load_data(spec, self.task, label_column=self.cfg.label_column)
        return make_loader(prepare(raw.x, self.task.preprocessing), raw.y, 256, shuffle=False)

    @property
    def remaining_rounds(self) -> int:
        return max(self.cfg.num_rounds - self.start_round, 0)

    def absolute_round(self, server_round: int) -> int:
        return self.start_round + server_round

    # --- parameters ---------------------------------------------------------------------

    def global_arrays(self) -> list[np.ndarray]:
        state = self.model.state_dict()
        return [state[k].detach().cpu().numpy() for k in self.keys]

    def load_arrays(self, arrays: list[np.ndarray]) -> None:
        state = {k: torch.from_numpy(np.asarray(a)) for k, a in zip(self.keys, arrays, strict=True)}
        self.model.load_state_dict(state, strict=False)

    def trainable_fraction(self) -> float:
        """Exchanged values over all values of the model (head mode sends less)."""
        state = self.model.state_dict()
        sent = sum(state[k].numel() for k in self.keys)
        return sent / max(count_parameters(state.values()), 1)

    def fit_config(self, server_round: int) -> dict[str, Any]:
        return {records.CFG_SERVER_ROUND: self.absolute_round(server_round)}

    # --- the round loop: one method per step, in this order (docs/round-loop.md) ---------

    def open_round(self, server_round: int, sampled: int, available: int) -> bool:
        """Step 0: check the privacy budget, then open the round's record.

        Returns False (and opens nothing) when the budget stops the run.
        """
        if not self.budget_allows(server_round, sampled, available):
            return False
        self.round_started = time.monotonic()
        self.pending = RoundRecord(
            self.absolute_round(server_round), sampled=sampled, available=available
        )
        self._step = _Step.OPEN
        self.max_sampled = max(self.max_sampled, sampled)
        self.max_available = max(self.max_available, available)
        events.emit(
            Event.ROUND_START, round=self.pending.round, total=self.cfg.num_rounds, sampled=sampled
        )
        return True

    def budget_allows(self, server_round: int, sampled: int, available: int) -> bool:
        """False (and say why) if the next round would take epsilon past the budget."""
        budget = self.cfg.privacy.epsilon_budget
        if budget <= 0 or self.cfg.privacy.dp == "none" or self.stopped_reason:
            return not self.stopped_reason
        absolute = self.absolute_round(server_round)
        if self.cfg.privacy.dp == "site":
            planned = site_round(absolute, sampled, available, self.cfg.privacy.noise_multiplier)
            next_eps = composed_epsilon([*self.site_rounds, planned], self.cfg.privacy.delta)
        else:
            next_eps = max(self.epsilon_next_by_site.values(), default=0.0)
        if next_eps > budget:
            self.stopped_reason = (
                f"stopped before round {absolute}: it would take epsilon to {next_eps:.2f}, "
                f"past the budget of {budget:g}"
            )
            events.emit(Event.BUDGET_STOP, round=absolute, epsilon_next=next_eps, budget=budget)
            log.warning(self.stopped_reason)
            return False
        return True

    def commit_round(
        self,
        clients: list[dict[str, Any]],
        failures: list[str],
        arrays: list[np.ndarray] | None,
        aggregated: bool = True,
        reason: str = "",
    ) -> None:
        """Step 1, aggregate -> checkpoint: take the new global model and write it to disk.

        ``arrays`` is the aggregate (None keeps the previous global model); ``aggregated``
        False says the strategy had results but declined to aggregate them (``reason``:
        why, when it said).
        """
        record = self._require(_Step.OPEN, "commit")
        record.clients = clients
        record.failures = failures
        for failure in failures:
            events.emit(Event.SITE_FAILED, round=record.round, reason=failure)
        self._account_privacy(record)
        if arrays is not None:
            self.load_arrays(arrays)
        if not aggregated:
            record.aggregated = False
            record.not_aggregated_reason = reason
            log.warning("round %d: the global model was not updated %s", record.round, reason)
            events.emit(Event.NOT_AGGREGATED, round=record.round, reason=reason)
        record.seconds = time.monotonic() - self.round_started
        # The record goes to disk before the checkpoint: a crash after the checkpoint
        # leaves what resume needs to write this round's metrics line (see _recover).
        atomic_write_json(self.run_dir / ROUND_RECORD_FILE, record.to_json())
        self._checkpoint(record.round)
        self._step = _Step.COMMITTED

    def evaluate(self, arrays: list[np.ndarray]) -> Metrics | None:
        """Step 2: server-side loss and accuracy of ``arrays``; no side effects.

        Evaluates a scratch copy of the model, so the global model and the run's
        record stay as they are. None when the run has no server-side eval set.
        """
        if self._eval_loader is None:
            return None
        if self._scratch is None:
            self._scratch = copy.deepcopy(self.model)
        state = {k: torch.from_numpy(np.asarray(a)) for k, a in zip(self.keys, arrays, strict=True)}
        self._scratch.load_state_dict(state, strict=False)
        return evaluate(self._scratch, self._eval_loader, self.device)

    def record_initial(self, metrics: Metrics | None) -> None:
        """The starting model's server-side result (only for a fresh run, not a resume)."""
        if self.start_round == 0 and metrics is not None:
            self.initial_accuracy = metrics.accuracy
            events.emit(Event.INITIAL, accuracy=metrics.accuracy, loss=metrics.loss)

    def record_server_eval(self, metrics: Metrics | None) -> None:
        """Step 3a: note the server-side evaluation of the committed model."""
        record = self._require(_Step.COMMITTED, "record the server evaluation of")
        if metrics is not None:
            record.server = {"loss": metrics.loss, "accuracy": metrics.accuracy}
        self._step = _Step.EVALUATED

    def record_federated_eval(self, loss: float | None, accuracy: float | None) -> None:
        """Step 3b: note the sites' evaluation of the committed model."""
        record = self._require(_Step.EVALUATED, "record the sites' evaluation of")
        if loss is not None:
            record.federated = {"loss": loss, "accuracy": accuracy or 0.0}

    def close_round(self) -> None:
        """Step 4: write the round's metrics line; the one place a round is recorded.

        A no-op when no round is open (the budget stopped the run).
        """
        if self.pending is None:
            return
        record = self._require(_Step.EVALUATED, "close")
        record.seconds = time.monotonic() - self.round_started
        self._record(record)
        self.pending = None
        self._step = _Step.CLOSED

    @property
    def round_open(self) -> bool:
        return self.pending is not None

    @property
    def round_committed(self) -> bool:
        return self.pending is not None and self._step >= _Step.COMMITTED

    def _require(self, step: "_Step", action: str) -> RoundRecord:
        """The open round, if the loop is at ``step``; otherwise the order was broken."""
        if self.pending is None or self._step != step:
            where = "no open round" if self.pending is None else f"at step {self._step.name}"
            raise RuntimeError(f"round loop out of order: cannot {action} a round ({where})")
        return self.pending

    def _account_privacy(self, record: RoundRecord) -> None:
        """Epsilon after this round: the sites' own (record level) or the server's (site level)."""
        if self.cfg.privacy.dp == "record":
            eps = [
                float(c[records.METRIC_EPSILON])
                for c in record.clients
                if records.METRIC_EPSILON in c
            ]
            if eps:
                self.epsilon = max(eps + ([self.epsilon] if self.epsilon else []))
            for c in record.clients:
                if records.METRIC_DP_SAMPLE_RATE in c:
                    row = self.dp_per_site.setdefault(str(c.get(records.METRIC_SITE)), {})
                    row["sample_rate"] = float(c[records.METRIC_DP_SAMPLE_RATE])
                    row["steps_per_round"] = int(c.get(records.METRIC_DP_STEPS, 0))
                    row["rounds"] = int(row.get("rounds", 0)) + 1
                if records.METRIC_EPSILON_NEXT in c:
                    self.epsilon_next_by_site[str(c.get(records.METRIC_SITE))] = float(
                        c[records.METRIC_EPSILON_NEXT]
                    )
        elif self.cfg.privacy.dp == "site":
            done = site_round(
                record.round, record.sampled, record.available, self.cfg.privacy.noise_multiplier
            )
            self.site_rounds = [r for r in self.site_rounds if r["round"] != record.round]
            self.site_rounds.append(done)
            self.epsilon = composed_epsilon(self.site_rounds, self.cfg.privacy.delta)
        record.epsilon = self.epsilon

    def _record(self, record: RoundRecord) -> None:
        row = record.to_json()
        append_jsonl(self.run_dir / METRICS_FILE, row)
        events.emit(Event.ROUND, **row, total=self.cfg.num_rounds)

    def _evaluate_model(self) -> Metrics | None:
        if self._eval_loader is None:
            return None
        return evaluate(self.model, self._eval_loader, self.device)

    def _checkpoint_metrics(self, server: dict[str, float]) -> dict[str, Any]:
        return {
            **server,
            "epsilon": self.epsilon,
            "epsilon_next_by_site": self.epsilon_next_by_site,
            "dp_per_site": self.dp_per_site,
            "site_rounds": self.site_rounds,
        }

    def _checkpoint(self, absolute: int) -> None:
        save_checkpoint(
            round_path(self.run_dir, absolute),
            self.model.state_dict(),
            absolute,
            self.cfg.model,
            self.task,
            self.cfg.to_flower(),
            self._checkpoint_metrics({}),
        )
        partial = {"initial_accuracy": self.initial_accuracy, "last_round": absolute}
        atomic_write_json(self.run_dir / "summary.partial.json", partial)

    # --- end of run -------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """Write the final model and summary.json; returns the summary."""
        if self.pending is not None:
            # Only an aborted workflow leaves a round open; it has no metrics line.
            log.warning("round %d was not closed; it is not recorded", self.pending.round)
            self.pending = None
        rows = read_jsonl(self.run_dir / METRICS_FILE)
        done = max((int(r["round"]) for r in rows), default=self.start_round)
        final = self._evaluate_model()
        server_metrics = {} if final is None else {"loss": final.loss, "accuracy": final.accuracy}
        save_checkpoint(
            self.run_dir / FINAL_MODEL,
            self.model.state_dict(),
            done,
            self.cfg.model,
            self.task,
            self.cfg.to_flower(),
            self._checkpoint_metrics(server_metrics),
        )
        clients = sorted(
            {str(c.get(records.METRIC_SITE)) for r in rows for c in r.get("clients", [])}
        )
        summary = {
            "task": self.cfg.task,
            "model": self.cfg.model,
            "mode": self.cfg.mode,
            "strategy": self.cfg.strategy,
            "rounds": done,
            "rounds_configured": self.cfg.num_rounds,
            "clients": len(clients),
            "sites": clients,
            "initial_accuracy": self.initial_accuracy,
            "final_accuracy": None if final is None else final.accuracy,
            "final_loss": None if final is None else final.loss,
            "trainable_fraction": self.trainable_fraction(),
            "bytes_down_total": sum(int(r.get("bytes_down", 0)) for r in rows),
            "bytes_up_total": sum(int(r.get("bytes_up", 0)) for r in rows),
            "failures": sum(len(r.get("failures", [])) for r in rows),
            "stopped": self.stopped_reason or None,
            "model_path": str(self.run_dir / FINAL_MODEL),
            "privacy": privacy_record(
                self.cfg,
                tls=os.environ.get(ENV_TLS) == "1",
                supernode_auth=os.environ.get(ENV_AUTH) == "1",
                rounds=done,
                epsilon=self.epsilon,
                sampled_clients=self.max_sampled,
                total_clients=self.max_available,
                per_site=self.dp_per_site,
                site_rounds=self.site_rounds,
            ),
        }
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        (self.run_dir / "summary.partial.json").unlink(missing_ok=True)
        events.emit(Event.DONE, summary=summary)
        return summary
