"""Which run directories the console shows: an index the server's machine keeps of its runs.

``fedge run`` records the run directory in ``SERVER_DATA_DIR/runs.json`` when it runs
on the server's machine, before it submits, so a run appears in the console while it
is going. The console addresses a run by a short hash of its path, never by a path
taken from a URL.
"""

import hashlib
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.shared.atomic import atomic_write_json, exclusive_lock

RUNS_FILE = "runs.json"
RUNS_FORMAT = "fedge-runs/1"
MAX_RUNS = 500  # the index keeps the newest runs; older run dirs stay on disk


@dataclass(frozen=True)
class IndexedRun:
    """One remembered run directory and its console id."""

    run_id: str
    run_dir: Path


def run_id(run_dir: Path) -> str:
    """The console's id of a run: 12 hex digits of its path's SHA-256."""
    return hashlib.sha256(str(run_dir).encode("utf-8")).hexdigest()[:12]


def _locked(server_dir: Path) -> AbstractContextManager[None]:
    """Serialize read-modify-write of the runs file between fedge commands."""
    return exclusive_lock(server_dir / (RUNS_FILE + ".lock"))


def _load(server_dir: Path) -> list[str]:
    try:
        data: Any = json.loads((server_dir / RUNS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    runs = data.get("runs") if isinstance(data, dict) else None
    return [r for r in runs if isinstance(r, str)] if isinstance(runs, list) else []


def remember_run(server_dir: Path, run_dir: Path) -> None:
    """Add ``run_dir`` to the index (newest last; an old entry of the same path moves up).

    Parameters
    ----------
    server_dir
        The server's data dir (``fedge server start --data-dir``).
    run_dir
        The run directory on this machine.
    """
    path = str(Path(run_dir).expanduser().resolve())
    with _locked(server_dir):
        runs = [r for r in _load(server_dir) if r != path] + [path]
        atomic_write_json(server_dir / RUNS_FILE, {"format": RUNS_FORMAT, "runs": runs[-MAX_RUNS:]})


def indexed_runs(server_dir: Path) -> list[IndexedRun]:
    """The remembered runs, newest first."""
    return [IndexedRun(run_id(Path(p)), Path(p)) for p in reversed(_load(server_dir))]
