"""Who submitted each Flower run through the front, so that a scientist reaches only their own.

Flower 1.42's open-source Control API has no notion of an account: any caller may stop,
list or follow any run. The front records the submitter of every run it starts
(``DATA_DIR/run-owners.json``, written atomically, 0600) and lets a data scientist act
only on runs recorded under their name; the operator may act on all. A run the front
did not start (one started on the server machine past the front) has no owner and is
the operator's alone.
"""

import json
import threading
from pathlib import Path

from fedge.shared.atomic import atomic_write_json

OWNERS_NAME = "run-owners.json"
OWNERS_FORMAT = "fedge-run-owners/1"
# Bound on the file: the oldest runs are forgotten past this (they stay the operator's).
MAX_RUNS = 10_000


class RunOwners:
    """The run id -> submitter map of one front, kept in memory and on disk.

    Parameters
    ----------
    data_dir
        The server's data dir; the map lives in ``data_dir / OWNERS_NAME``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / OWNERS_NAME
        self._lock = threading.Lock()
        self._owners: dict[int, str] = self._read()

    def _read(self) -> dict[int, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            # Unreadable: nobody but the operator owns anything (fail closed).
            return {}
        runs = data.get("runs") if isinstance(data, dict) else None
        if not isinstance(runs, dict) or data.get("format") != OWNERS_FORMAT:
            return {}
        out: dict[int, str] = {}
        for key, name in runs.items():
            if isinstance(key, str) and key.isdigit() and isinstance(name, str):
                out[int(key)] = name
        return out

    def record(self, run_id: int, name: str) -> None:
        """Note that ``name`` submitted ``run_id`` (blocking: call it off the event loop)."""
        with self._lock:
            self._owners[int(run_id)] = name
            while len(self._owners) > MAX_RUNS:
                del self._owners[next(iter(self._owners))]
            runs = {str(k): v for k, v in self._owners.items()}
            atomic_write_json(self.path, {"format": OWNERS_FORMAT, "runs": runs}, mode=0o600)

    def owner(self, run_id: int) -> str | None:
        """Who submitted ``run_id`` through the front, or None."""
        with self._lock:
            return self._owners.get(int(run_id))

    def owned_by(self, name: str) -> set[int]:
        """The run ids ``name`` submitted."""
        with self._lock:
            return {run_id for run_id, owner in self._owners.items() if owner == name}
