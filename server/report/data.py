"""Read what a run directory holds into one typed value, for the report and the console.

A run directory is written by the ServerApp (``metrics.jsonl`` one line per round,
``summary.partial.json`` while it runs, ``summary.json`` when it is done,
``run_config.json``, ``checkpoints/``). Everything here is read-only and tolerant:
the console reads runs that are still being written, so a missing or half-written
file means "not yet", never an exception.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.shared import records
from fedge.shared.atomic import read_jsonl
from fedge.shared.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PARTIAL_SUMMARY_FILE = "summary.partial.json"
RUN_CONFIG_FILE = "run_config.json"
# A report must stay a report: a metrics file past this size is not a fedge run's.
MAX_METRICS_BYTES = 64 * 1024 * 1024
MAX_JSON_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SiteTotals:
    """One site's share of a run: rounds it trained in, bytes it moved, its last metrics."""

    site: str
    rounds: int
    examples: int
    bytes_down: int
    bytes_up: int
    last_loss: float | None
    last_accuracy: float | None
    epsilon: float | None
    failures: int = 0


@dataclass(frozen=True)
class RunData:
    """Everything the report and the console show about one run."""

    run_dir: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    config: dict[str, Any]
    finished: bool
    sites: list[SiteTotals] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The run directory's name (how the console lists it)."""
        return self.run_dir.name

    @property
    def rounds_done(self) -> int:
        """Rounds recorded so far."""
        return max((int(r.get("round", 0)) for r in self.rows), default=0)

    @property
    def rounds_configured(self) -> int:
        """Rounds the run was asked for (0 if its config cannot be read)."""
        value = self.summary.get("rounds_configured") or self.config.get("num-rounds") or 0
        return int(value) if isinstance(value, int | float) else 0

    @property
    def state(self) -> str:
        """``finished``, ``stopped`` (budget), ``running`` or ``starting``."""
        if self.finished:
            return "stopped" if self.summary.get("stopped") else "finished"
        return "running" if self.rows else "starting"

    @property
    def privacy(self) -> dict[str, Any]:
        """The privacy record of summary.json (empty until the run is done)."""
        value = self.summary.get("privacy")
        return value if isinstance(value, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing, too big or not (yet) valid."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def number(value: Any) -> float | None:
    """``value`` as a finite float, or None (metrics come from remote sites)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int:
    n = number(value)
    return int(n) if n is not None and n >= 0 else 0


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a run directory (a run config or metrics in it)."""
    return path.is_dir() and ((path / RUN_CONFIG_FILE).is_file() or (path / METRICS_FILE).is_file())


def load_run(run_dir: Path | str) -> RunData:
    """Read a run directory, finished or still running.

    Parameters
    ----------
    run_dir
        A directory written by a fedge run (``fedge run --out``, the demo's ``OUT/run``).

    Returns
    -------
    RunData
        Rows in round order (a round recorded twice after a resume: the later line wins).

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a run directory, or its metrics file is implausibly large.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not is_run_dir(run_dir):
        raise ConfigError(
            f"{run_dir} is not a run directory (no {RUN_CONFIG_FILE} or {METRICS_FILE})",
            hint="pass the folder given to `fedge run --out` (the demo's is OUT/run)",
        )
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > MAX_METRICS_BYTES:
        raise ConfigError(f"{metrics} is larger than {MAX_METRICS_BYTES} bytes; not a fedge run")
    by_round: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(metrics):
        if isinstance(row, dict) and _int(row.get("round")) > 0:
            by_round[_int(row["round"])] = row
    rows = [by_round[k] for k in sorted(by_round)]
    summary = _read_json(run_dir / SUMMARY_FILE)
    finished = bool(summary)
    if not finished:
        summary = _read_json(run_dir / PARTIAL_SUMMARY_FILE)
    config = _read_json(run_dir / RUN_CONFIG_FILE)
    return RunData(run_dir, rows, summary, config, finished, site_totals(rows))


def _clients(row: dict[str, Any]) -> list[dict[str, Any]]:
    clients = row.get("clients")
    return [c for c in clients if isinstance(c, dict)] if isinstance(clients, list) else []


def site_name(client: dict[str, Any]) -> str:
    """The site a client reply came from (bounded: names are shown and plotted)."""
    return str(client.get(records.METRIC_SITE) or "?")[:80]


def site_totals(rows: list[dict[str, Any]]) -> list[SiteTotals]:
    """Per-site totals over ``rows``, by site name."""
    acc: dict[str, dict[str, Any]] = {}
    for row in rows:
        for c in _clients(row):
            s = acc.setdefault(
                site_name(c),
                {
                    "rounds": 0,
                    "examples": 0,
                    "down": 0,
                    "up": 0,
                    "loss": None,
                    "acc": None,
                    "eps": None,
                },
            )
            s["rounds"] += 1
            s["examples"] += _int(c.get("num_examples"))
            s["down"] += _int(c.get(records.METRIC_BYTES_DOWN))
            s["up"] += _int(c.get(records.METRIC_BYTES_UP))
            s["loss"] = number(c.get(records.METRIC_LOSS))
            s["acc"] = number(c.get(records.METRIC_ACCURACY))
            eps = number(c.get(records.METRIC_EPSILON))
            s["eps"] = eps if eps is not None else s["eps"]
    return [
        SiteTotals(
            name, s["rounds"], s["examples"], s["down"], s["up"], s["loss"], s["acc"], s["eps"]
        )
        for name, s in sorted(acc.items())
    ]


def series(rows: list[dict[str, Any]], section: str, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of ``row[section][key]`` where it is a finite number."""
    xs: list[int] = []
    ys: list[float] = []
    for row in rows:
        block = row.get(section) if section else row
        value = number(block.get(key)) if isinstance(block, dict) else None
        if value is not None:
            xs.append(_int(row.get("round")))
            ys.append(value)
    return xs, ys


def site_bytes(rows: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[int]]]:
    """Per site: (rounds, bytes down + up in that round)."""
    out: dict[str, tuple[list[int], list[int]]] = {}
    for row in rows:
        for c in _clients(row):
            xs, ys = out.setdefault(site_name(c), ([], []))
            xs.append(_int(row.get("round")))
            ys.append(_int(c.get(records.METRIC_BYTES_DOWN)) + _int(c.get(records.METRIC_BYTES_UP)))
    return dict(sorted(out.items()))
