"""Enroll edge devices with operator-created bearer tokens, authenticate them, store reports.

Each device gets one random 256-bit token, shown once when the operator adds
it. The server keeps only its sha256: a leaked database does not let anyone
impersonate a device, and because the token is random (not a password) a fast
hash is enough. Revoking keeps the row (the device is then refused with 403,
and the fleet view still shows its history).
"""

import contextlib
import hashlib
import json
import re
import secrets
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from fedge.server.registry.store import check_channel, connect, now_iso, transaction
from fedge.shared.errors import RegistryError, SecurityError
from fedge.shared.fleet_protocol import ProtocolError, StatusReport

__all__ = ["Device", "DeviceRevoked", "DeviceStore", "DeviceUnknown", "StatusReport"]

TOKEN_PREFIX = "fedge_dev_"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_CHANNEL = "stable"


class DeviceUnknown(SecurityError):
    """No enrolled device has this token (HTTP 401)."""


class DeviceRevoked(SecurityError):
    """The token belongs to a device the operator revoked (HTTP 403)."""


@dataclass(frozen=True)
class Device:
    """An enrolled device (never holds its token) and the channels it may follow."""

    name: str
    created_at: str
    revoked_at: str | None
    channels: tuple[str, ...] = (DEFAULT_CHANNEL,)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def token_hash(token: str) -> str:
    """sha256 hex of a token: what the server stores and looks tokens up by."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"device name {name!r} is not valid; use letters, digits, '.', '_' or '-' (max 64)"
        )
    return name


def _check_channels(channels: tuple[str, ...]) -> tuple[str, ...]:
    if not channels:
        raise RegistryError("a device needs at least one channel to follow")
    return tuple(dict.fromkeys(check_channel(c) for c in channels))


def _device(row: sqlite3.Row) -> Device:
    raw = row["channels"]
    channels = tuple(json.loads(raw)) if raw else (DEFAULT_CHANNEL,)
    return Device(row["name"], row["created_at"], row["revoked_at"], channels)


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class DeviceStore:
    """Devices of the registry at ``data_dir`` (same SQLite file as the versions)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).expanduser()

    def connect(self) -> sqlite3.Connection:
        return connect(self.data_dir)

    def add(self, name: str, channels: tuple[str, ...] = (DEFAULT_CHANNEL,)) -> str:
        """Enroll ``name``; return its token (the only time it is ever visible).

        ``channels`` are the channels it may follow (and download the versions of);
        by default only ``stable``.

        Raises
        ------
        RegistryError
            If the name is invalid or already taken (revoked names stay taken, for audit).
        """
        _check_name(name)
        allowed = _check_channels(channels)
        token = _new_token()
        with contextlib.closing(self.connect()) as conn, transaction(conn):
            if conn.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise RegistryError(
                    f"device {name!r} is already enrolled; use `fedge registry device rotate "
                    f"{name}` for a new token, or choose another name"
                )
            conn.execute(
                "INSERT INTO devices (name, token_sha256, created_at, channels) "
                "VALUES (?, ?, ?, ?)",
                (name, token_hash(token), now_iso(), json.dumps(list(allowed))),
            )
        return token

    def rotate(self, name: str) -> str:
        """Give an enrolled, unrevoked device a new token; the old one stops working at once."""
        token = _new_token()
        with contextlib.closing(self.connect()) as conn, transaction(conn):
            device = self._get(conn, name)
            if device.revoked:
                raise RegistryError(f"device {name!r} is revoked; enroll it under a new name")
            conn.execute(
                "UPDATE devices SET token_sha256 = ? WHERE name = ?", (token_hash(token), name)
            )
        return token

    def set_channels(self, name: str, channels: tuple[str, ...]) -> tuple[str, ...]:
        """Replace the channels ``name`` may follow; returns them."""
        allowed = _check_channels(channels)
        with contextlib.closing(self.connect()) as conn, transaction(conn):
            self._get(conn, name)
            conn.execute(
                "UPDATE devices SET channels = ? WHERE name = ?", (json.dumps(list(allowed)), name)
            )
        return allowed

    def revoke(self, name: str) -> bool:
        """Revoke ``name``; False if it was already revoked."""
        with contextlib.closing(self.connect()) as conn, transaction(conn):
            device = self._get(conn, name)
            if device.revoked:
                return False
            conn.execute("UPDATE devices SET revoked_at = ? WHERE name = ?", (now_iso(), name))
            return True

    def list(self) -> list[Device]:
        """Every enrolled device, revoked ones included, by name."""
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute("SELECT * FROM devices ORDER BY name").fetchall()
        return [_device(r) for r in rows]

    def get(self, name: str) -> Device:
        with contextlib.closing(self.connect()) as conn:
            return self._get(conn, name)

    def _get(self, conn: sqlite3.Connection, name: str) -> Device:
        row = conn.execute("SELECT * FROM devices WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise RegistryError(
                f"no device named {name!r}; see `fedge registry device list`",
                hint="enroll it with `fedge registry device add NAME`",
            )
        return _device(row)

    def authenticate(self, token: str | None) -> Device:
        """The device that owns ``token``; also records that it was seen now.

        Raises
        ------
        DeviceUnknown
            No token, or a token no device has (401).
        DeviceRevoked
            The device was revoked (403).
        """
        if not token:
            raise DeviceUnknown("no device token given (Authorization: Bearer TOKEN)")
        with contextlib.closing(self.connect()) as conn:
            # Looking up by the hash of a random 256-bit token leaks nothing through timing.
            row = conn.execute(
                "SELECT * FROM devices WHERE token_sha256 = ?", (token_hash(token),)
            ).fetchone()
            if row is None:
                raise DeviceUnknown("unknown device token")
            device = _device(row)
            if device.revoked:
                raise DeviceRevoked(f"device {device.name!r} was revoked on {device.revoked_at}")
            with transaction(conn):
                conn.execute(
                    "INSERT INTO device_status (name, last_seen) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen",
                    (device.name, now_iso()),
                )
        return device

    def record_status(self, name: str, report: StatusReport) -> None:
        """Store ``report`` as the device's latest status (validated again: it may come from code).

        Raises
        ------
        RegistryError
            A field out of bounds (see ``fleet_protocol.StatusReport``).
        """
        try:
            report = StatusReport.from_dict(report.to_dict())
        except ProtocolError as e:
            raise RegistryError(f"status report refused: {e}") from e
        now = now_iso()
        values = (
            name,
            report.channel,
            report.active_version,
            report.health,
            report.latency_p50_ms,
            report.latency_p99_ms,
            report.last_error,
            now,
            now,
            json.dumps(report.detail or {}, sort_keys=True),
        )
        with contextlib.closing(self.connect()) as conn, transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO device_status (name, channel, active_version, health, "
                "latency_p50_ms, latency_p99_ms, last_error, reported_at, last_seen, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
