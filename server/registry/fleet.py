"""The fleet view: what each enrolled device last reported, and whether it is still reporting."""

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedge.server.registry.store import connect
from fedge.shared.errors import RegistryError

# A device that has not called in for this long is shown as offline.
OFFLINE_AFTER_S = 120.0


@dataclass(frozen=True)
class DeviceView:
    """One device as the fleet view shows it."""

    name: str
    enrolled_at: str
    revoked_at: str | None
    channel: str | None
    active_version: str | None
    health: str | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    last_error: str | None
    reported_at: str | None
    last_seen: str | None
    detail: dict[str, Any]

    def seen_ago_s(self, now: datetime | None = None) -> float | None:
        """Seconds since the device last called in, or None if it never did."""
        if self.last_seen is None:
            return None
        now = now or datetime.now(UTC)
        return (now - datetime.fromisoformat(self.last_seen)).total_seconds()

    @property
    def state(self) -> str:
        """``revoked``, ``never seen``, ``offline`` or ``online``."""
        if self.revoked_at is not None:
            return "revoked"
        ago = self.seen_ago_s()
        if ago is None:
            return "never seen"
        return "offline" if ago > OFFLINE_AFTER_S else "online"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["state"] = self.state
        return out


_QUERY = (
    "SELECT d.name, d.created_at, d.revoked_at, s.channel, s.active_version, s.health, "
    "s.latency_p50_ms, s.latency_p99_ms, s.last_error, s.reported_at, s.last_seen, s.detail "
    "FROM devices d LEFT JOIN device_status s ON s.name = d.name"
)


def _view(row: Any) -> DeviceView:
    return DeviceView(
        name=row["name"],
        enrolled_at=row["created_at"],
        revoked_at=row["revoked_at"],
        channel=row["channel"],
        active_version=row["active_version"],
        health=row["health"],
        latency_p50_ms=row["latency_p50_ms"],
        latency_p99_ms=row["latency_p99_ms"],
        last_error=row["last_error"],
        reported_at=row["reported_at"],
        last_seen=row["last_seen"],
        detail=json.loads(row["detail"]) if row["detail"] else {},
    )


def fleet(data_dir: Path | str) -> list[DeviceView]:
    """Every enrolled device with its latest report, by name.

    Parameters
    ----------
    data_dir
        The registry's data directory.
    """
    with contextlib.closing(connect(Path(data_dir))) as conn:
        rows = conn.execute(_QUERY + " ORDER BY d.name").fetchall()
    return [_view(row) for row in rows]


def device_view(data_dir: Path | str, name: str) -> DeviceView:
    """One device's latest report.

    Raises
    ------
    RegistryError
        If no device has that name.
    """
    with contextlib.closing(connect(Path(data_dir))) as conn:
        row = conn.execute(_QUERY + " WHERE d.name = ?", (name,)).fetchone()
    if row is None:
        raise RegistryError(f"no device named {name!r}; see `fedge fleet list`")
    return _view(row)
