"""Progress lines from the ServerApp, readable by people and by ``fedge run``.

The ServerApp runs in a process the SuperLink starts; its output reaches the
user through ``flwr run --stream``. Each event is one line: a prefix and a JSON
object, which ``fedge run`` turns into a progress bar and a table.
"""

import json
import logging
from typing import Any

from fedge.shared.records import EVENT_PREFIX

log = logging.getLogger(__name__)


def emit(kind: str, **fields: Any) -> None:
    """Print one event line (flushed: the stream is read while the run goes on)."""
    print(EVENT_PREFIX + json.dumps({"event": kind, **fields}, sort_keys=True), flush=True)


def parse(line: str) -> dict[str, Any] | None:
    """The event in ``line``, or None if it is ordinary log output."""
    index = line.find(EVENT_PREFIX)
    if index < 0:
        return None
    try:
        event = json.loads(line[index + len(EVENT_PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None
