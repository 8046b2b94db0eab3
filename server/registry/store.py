"""Immutable bundle versions and channels, kept in a directory plus one SQLite file.

Layout under the registry's data directory::

    registry.sqlite            versions, channel history, devices, device status
    versions/<version>/bundle/ the verified bundle directory (never changed after publish)
    versions/<version>/bundle.tar   the same bundle as the uncompressed tar devices download
    staging/                   work space of a publish in progress

A publish copies the bundle into ``staging/``, verifies the copy and its tar,
renames the finished version into ``versions/`` and then records it in one
SQLite transaction. A crash at any point leaves either no trace of the version
(staging and unrecorded directories are swept when the registry is next opened)
or the whole version, never half of one.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedge.shared.atomic import fsync_dir
from fedge.shared.errors import RegistryError
from fedge.shared.processes import is_running

DB_NAME = "registry.sqlite"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version TEXT PRIMARY KEY,
    bundle_id TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    tar_sha256 TEXT NOT NULL,
    tar_size INTEGER NOT NULL,
    task TEXT NOT NULL,
    artifacts TEXT NOT NULL,
    created_at TEXT NOT NULL,
    published_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    version TEXT NOT NULL REFERENCES versions(version),
    action TEXT NOT NULL,
    at TEXT NOT NULL,
    rolled_back_at TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS device_status (
    name TEXT PRIMARY KEY REFERENCES devices(name),
    channel TEXT,
    active_version TEXT,
    health TEXT,
    latency_p50_ms REAL,
    latency_p99_ms REAL,
    last_error TEXT,
    reported_at TEXT,
    last_seen TEXT,
    detail TEXT
);
"""


def now_iso() -> str:
    """The current UTC time as ISO-8601 with seconds (how every timestamp here is stored)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


_READY: set[Path] = set()  # databases whose schema this process already made sure of


def connect(data_dir: Path) -> sqlite3.Connection:
    """Open the registry database (creating the schema); WAL lets the API read while CLI writes."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = (data_dir / DB_NAME).resolve()
    fresh = not path.exists()
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=FULL")
    if fresh or path not in _READY:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
        conn.executescript(_SCHEMA)
        _READY.add(path)
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One SQLite write transaction: all of it is committed, or none of it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@dataclass(frozen=True)
class VersionRecord:
    """A published, immutable bundle version."""

    version: str
    bundle_id: str
    manifest_sha256: str
    tar_sha256: str
    tar_size: int
    task: str
    artifacts: tuple[str, ...]
    created_at: str
    published_at: str
    channels: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelEvent:
    """One assignment of a version to a channel; rolled-back ones stay as history."""

    channel: str
    version: str
    action: str
    at: str
    rolled_back_at: str | None


def check_channel(channel: str) -> str:
    """Return ``channel`` if it is a valid channel name, else raise ``RegistryError``."""
    if not _CHANNEL_RE.match(channel):
        raise RegistryError(
            f"channel name {channel!r} is not valid; use lowercase letters, digits, '-' or '_'"
        )
    return channel


def check_version(version: str) -> str:
    """Return ``version`` if it can name a directory safely, else raise ``RegistryError``."""
    if not _VERSION_RE.match(version):
        raise RegistryError(
            f"bundle version {version!r} cannot be stored: use letters, digits, '.', '_', '+'"
            " or '-' (at most 128, starting with a letter or digit); re-export with another version"
        )
    return version


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so a rename of ``root`` is durable."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Registry:
    """A registry rooted at ``data_dir`` (see the module docstring for the layout)."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.versions_dir = self.data_dir / "versions"
        self.staging_dir = self.data_dir / "staging"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        with self.locked():
            self._sweep()

    # -- plumbing ------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A new connection to this registry's database (one per thread or request)."""
        return connect(self.data_dir)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (two CLI publishes at once) with an exclusive file lock."""
        with open(self.data_dir / ".lock", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        """Remove what an interrupted publish left: staging dirs and unrecorded versions."""
        for leftover in self.staging_dir.iterdir():
            # A publish running in another process right now keeps its staging dir.
            owner = leftover.name.split("-", 1)[0]
            if not (owner.isdigit() and _process_alive(int(owner))):
                shutil.rmtree(leftover, ignore_errors=True)
        with contextlib.closing(self.connect()) as conn:
            known = {row["version"] for row in conn.execute("SELECT version FROM versions")}
        for path in self.versions_dir.iterdir():
            if path.name not in known:
                shutil.rmtree(path, ignore_errors=True)

    def version_dir(self, version: str) -> Path:
        """Directory of a stored version (``bundle/`` and ``bundle.tar`` inside)."""
        return self.versions_dir / check_version(version)

    def bundle_dir(self, version: str) -> Path:
        """The stored, verified bundle directory of ``version``."""
        return self.version_dir(version) / "bundle"

    def tar_path(self, version: str) -> Path:
        """The tar devices download for ``version``."""
        return self.version_dir(version) / "bundle.tar"

    # -- reads ---------------------------------------------------------------------------------

    def get_version(self, version: str) -> VersionRecord:
        """The record of ``version``; ``RegistryError`` if it was never published."""
        with contextlib.closing(self.connect()) as conn:
            row = conn.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise RegistryError(f"version {version!r} is not in the registry")
            return _record(row, self._channels_of(conn).get(version, ()))

    def list_versions(self) -> list[VersionRecord]:
        """Every published version, oldest first, with the channels that currently point at it."""
        with contextlib.closing(self.connect()) as conn:
            channels = self._channels_of(conn)
            rows = conn.execute("SELECT * FROM versions ORDER BY published_at, version").fetchall()
            return [_record(row, channels.get(row["version"], ())) for row in rows]

    def current(self, channel: str) -> str | None:
        """The version ``channel`` points at now, or None if nothing was ever put there."""
        with contextlib.closing(self.connect()) as conn:
            return _current(conn, channel)

    def channels(self) -> dict[str, str]:
        """Every channel and the version it points at now."""
        with contextlib.closing(self.connect()) as conn:
            names = [r[0] for r in conn.execute("SELECT DISTINCT channel FROM channel_history")]
            current = {name: _current(conn, name) for name in sorted(names)}
        return {name: version for name, version in current.items() if version is not None}

    def history(self, channel: str | None = None) -> list[ChannelEvent]:
        """Channel assignments, oldest first (rolled-back ones included, with their time)."""
        query = "SELECT * FROM channel_history"
        params: tuple[str, ...] = ()
        if channel is not None:
            query += " WHERE channel = ?"
            params = (channel,)
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        return [
            ChannelEvent(r["channel"], r["version"], r["action"], r["at"], r["rolled_back_at"])
            for r in rows
        ]

    def _channels_of(self, conn: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
        names = [r[0] for r in conn.execute("SELECT DISTINCT channel FROM channel_history")]
        by_version: dict[str, list[str]] = {}
        for name in sorted(names):
            version = _current(conn, name)
            if version is not None:
                by_version.setdefault(version, []).append(name)
        return {version: tuple(names) for version, names in by_version.items()}

    # -- writes --------------------------------------------------------------------------------

    def add_version(
        self, staged: Path, record: VersionRecord, channel: str | None
    ) -> tuple[VersionRecord, bool]:
        """Move a staged, verified version into place and record it (see ``publish``).

        ``staged`` holds ``bundle/`` and ``bundle.tar``. Returns the stored record and
        whether it is new (False: the same content was already published, idempotent).
        """
        if channel is not None:
            check_channel(channel)
        with self.locked(), contextlib.closing(self.connect()) as conn:
            row = conn.execute(
                "SELECT * FROM versions WHERE version = ?", (record.version,)
            ).fetchone()
            if row is not None and row["manifest_sha256"] != record.manifest_sha256:
                raise RegistryError(
                    f"version {record.version!r} is already published with different content;"
                    " versions are immutable: export the new model under a new version"
                )
            created = row is None
            target = self.version_dir(record.version)
            if created:
                # A directory without a row is what a crash after the rename leaves.
                if target.exists():
                    shutil.rmtree(target)
                fsync_tree(staged)
                os.rename(staged, target)
                fsync_dir(self.versions_dir)
            try:
                with transaction(conn):
                    if created:
                        conn.execute(
                            "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                record.version,
                                record.bundle_id,
                                record.manifest_sha256,
                                record.tar_sha256,
                                record.tar_size,
                                record.task,
                                json.dumps(list(record.artifacts)),
                                record.created_at,
                                record.published_at,
                            ),
                        )
                    if channel is not None and _current(conn, channel) != record.version:
                        _assign(conn, channel, record.version, "publish")
            except BaseException:
                if created:
                    shutil.rmtree(target, ignore_errors=True)
                raise
        return self.get_version(record.version), created

    def promote(self, version: str, channel: str) -> bool:
        """Point ``channel`` at ``version``; False if it already pointed there."""
        check_channel(channel)
        with self.locked(), contextlib.closing(self.connect()) as conn, transaction(conn):
            exists = conn.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone()
            if exists is None:
                raise RegistryError(
                    f"version {version!r} is not in the registry; publish it first "
                    "(`fedge registry publish BUNDLE`)"
                )
            if _current(conn, channel) == version:
                return False
            _assign(conn, channel, version, "promote")
            return True

    def rollback(self, channel: str) -> tuple[str, str]:
        """Return ``channel`` to the version it had before its current one.

        The current assignment is marked rolled back (kept as history), so rolling
        back twice walks two steps back. Returns (from_version, to_version).

        Raises
        ------
        RegistryError
            If the channel is empty or has no earlier version.
        """
        check_channel(channel)
        with self.locked(), contextlib.closing(self.connect()) as conn, transaction(conn):
            rows = conn.execute(
                "SELECT id, version FROM channel_history WHERE channel = ? "
                "AND rolled_back_at IS NULL ORDER BY id DESC LIMIT 2",
                (channel,),
            ).fetchall()
            if not rows:
                raise RegistryError(f"channel {channel!r} has no version to roll back")
            if len(rows) < 2:
                raise RegistryError(
                    f"channel {channel!r} has no earlier version than {rows[0]['version']!r};"
                    " nothing to roll back to"
                )
            conn.execute(
                "UPDATE channel_history SET rolled_back_at = ? WHERE id = ?",
                (now_iso(), rows[0]["id"]),
            )
            return str(rows[0]["version"]), str(rows[1]["version"])

    def new_staging(self) -> Path:
        """A fresh, empty staging directory for one publish."""
        path = self.staging_dir / f"{os.getpid()}-{uuid.uuid4().hex}"
        path.mkdir()
        return path


def _current(conn: sqlite3.Connection, channel: str) -> str | None:
    row = conn.execute(
        "SELECT version FROM channel_history WHERE channel = ? AND rolled_back_at IS NULL "
        "ORDER BY id DESC LIMIT 1",
        (channel,),
    ).fetchone()
    return None if row is None else str(row["version"])


def _assign(conn: sqlite3.Connection, channel: str, version: str, action: str) -> None:
    conn.execute(
        "INSERT INTO channel_history (channel, version, action, at) VALUES (?, ?, ?, ?)",
        (channel, version, action, now_iso()),
    )


def _record(row: sqlite3.Row, channels: tuple[str, ...]) -> VersionRecord:
    return VersionRecord(
        version=row["version"],
        bundle_id=row["bundle_id"],
        manifest_sha256=row["manifest_sha256"],
        tar_sha256=row["tar_sha256"],
        tar_size=int(row["tar_size"]),
        task=row["task"],
        artifacts=tuple(json.loads(row["artifacts"])),
        created_at=row["created_at"],
        published_at=row["published_at"],
        channels=channels,
    )


def _process_alive(pid: int) -> bool:
    return pid == os.getpid() or is_running(pid)
