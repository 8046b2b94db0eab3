"""Progress lines from the ServerApp, readable by people and by ``fedge run``.

The ServerApp runs in a process the SuperLink starts; its output reaches the
user through ``flwr run --stream``. Each event is one line: a prefix and a JSON
object, which ``fedge run`` turns into a progress bar and a table. Every kind
of event is a member of ``Event``: emitters and readers name the same constants.
"""

import json
import logging
from enum import StrEnum
from typing import Any

from fedge.shared.records import EVENT_PREFIX

log = logging.getLogger(__name__)


class Event(StrEnum):
    """The kinds of event line (the ``event`` field); a str, so it compares to JSON text."""

    INITIAL = "initial"  # the starting model's server-side accuracy
    RESUME = "resume"  # a run continues after its last checkpoint
    ROUND_START = "round-start"  # sites sampled for a round
    BUDGET_STOP = "budget-stop"  # the next round would exceed the privacy budget
    SITE_FAILED = "site-failed"  # a site's training failed; the others were aggregated
    NOT_AGGREGATED = "not-aggregated"  # the strategy kept the previous global model
    ROUND = "round"  # a round is recorded: its metrics.jsonl line (also when recovered)
    DONE = "done"  # summary.json is written
    ERROR = "error"  # the run failed with a user-facing error
    EXCHANGE = "exchange"  # one push-and-pull of messages with the sites (its timings)


def emit(kind: Event, **fields: Any) -> None:
    """Print one event line (flushed: the stream is read while the run goes on)."""
    line = json.dumps({"event": str(kind), **fields}, sort_keys=True)
    print(EVENT_PREFIX + line, flush=True)


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
