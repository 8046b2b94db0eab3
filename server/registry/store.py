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
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fedge.shared import signing
from fedge.shared.atomic import exclusive_lock, fsync_dir, fsync_tree
from fedge.shared.errors import RegistryError, SecurityError
from fedge.shared.fleet_protocol import (
    CHANNEL_RE,
    VERSION_RE,
    ChannelStatement,
    SignedStatement,
)
from fedge.shared.processes import is_running

DB_NAME = "registry.sqlite"
_VERSION_RE = VERSION_RE
_CHANNEL_RE = CHANNEL_RE
# How long a signed channel statement stays valid: a registry that keeps serving an old
# one (a freeze attack) is refused by devices after this; `fedge registry refresh` re-signs.
DEFAULT_STATEMENT_DAYS = 30.0

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
CREATE TABLE IF NOT EXISTS channel_statements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    version TEXT NOT NULL REFERENCES versions(version),
    statement TEXT NOT NULL,
    signature TEXT NOT NULL
);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Add columns that registries made by older fedge versions lack."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(devices)")}
    if "channels" not in columns:
        # JSON list of the channels a device may follow; NULL reads as ["stable"].
        conn.execute("ALTER TABLE devices ADD COLUMN channels TEXT")


def now_iso() -> str:
    """The current UTC time as ISO-8601 with seconds (how every timestamp here is stored)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


_READY: set[Path] = set()  # databases whose schema this process already made sure of


def connect(data_dir: Path) -> sqlite3.Connection:
    """Open the registry database (creating the schema); WAL lets the API read while CLI writes."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # --data-dir names a file, or a folder this user cannot write
        raise RegistryError(f"cannot use {data_dir} as the registry: {e.strerror}") from e
    path = (data_dir / DB_NAME).resolve()
    fresh = not path.exists()
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA synchronous=FULL")
    if fresh or path not in _READY:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file
        conn.executescript(_SCHEMA)
        _migrate(conn)
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
    if not _CHANNEL_RE.fullmatch(channel):
        raise RegistryError(
            f"channel name {channel!r} is not valid; use lowercase letters, digits, '-' or '_'"
        )
    return channel


def check_version(version: str) -> str:
    """Return ``version`` if it can name a directory safely, else raise ``RegistryError``."""
    if not _VERSION_RE.fullmatch(version):
        raise RegistryError(
            f"bundle version {version!r} cannot be stored: use letters, digits, '.', '_', '+'"
            " or '-' (at most 128, starting with a letter or digit); re-export with another version"
        )
    return version


class Registry:
    """A registry rooted at ``data_dir`` (see the module docstring for the layout)."""

    def __init__(
        self,
        data_dir: Path | str,
        signing_key: Path | signing.Ed25519PrivateKey | None = None,
        statement_days: float = DEFAULT_STATEMENT_DAYS,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self._signing_key = signing_key
        self.statement_days = statement_days
        self.versions_dir = self.data_dir / "versions"
        self.staging_dir = self.data_dir / "staging"
        try:
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # --data-dir names a file, or a folder this user cannot write
            raise RegistryError(f"cannot use {self.data_dir} as the registry: {e.strerror}") from e
        with self.locked():
            self._sweep()

    # -- plumbing ------------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A new connection to this registry's database (one per thread or request)."""
        return connect(self.data_dir)

    def locked(self) -> AbstractContextManager[None]:
        """Serialise writers (two CLI publishes at once) with an exclusive file lock."""
        return exclusive_lock(self.data_dir / ".lock")

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
        key = None
        if channel is not None:
            check_channel(channel)
            key = self.signing_key()
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
                        self._check_not_older(conn, channel, record.version, False)
                        _assign(conn, channel, record.version, "publish")
                        self._sign(conn, channel, record.version, "publish", key)
            except BaseException:
                if created:
                    shutil.rmtree(target, ignore_errors=True)
                raise
        return self.get_version(record.version), created

    def promote(self, version: str, channel: str, rollback: bool = False) -> bool:
        """Point ``channel`` at ``version``; False if it already pointed there.

        A version published before the channel's current one is a downgrade, which
        devices refuse unless the operator signed it as a rollback: pass ``rollback``.

        Raises
        ------
        RegistryError
            Unknown version, or an older version without ``rollback``.
        SecurityError
            No usable operator signing key.
        """
        check_channel(channel)
        key = self.signing_key()
        with self.locked(), contextlib.closing(self.connect()) as conn, transaction(conn):
            exists = conn.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone()
            if exists is None:
                raise RegistryError(
                    f"version {version!r} is not in the registry; publish it first "
                    "(`fedge registry publish BUNDLE`)"
                )
            if _current(conn, channel) == version:
                return False
            self._check_not_older(conn, channel, version, rollback)
            _assign(conn, channel, version, "rollback" if rollback else "promote")
            self._sign(conn, channel, version, "rollback" if rollback else "promote", key)
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
        key = self.signing_key()
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
            self._sign(conn, channel, str(rows[1]["version"]), "rollback", key)
            return str(rows[0]["version"]), str(rows[1]["version"])

    # -- signed channel statements -------------------------------------------------------------

    def signing_key(self) -> signing.Ed25519PrivateKey:
        """The operator key that signs channel statements (loaded on first use).

        Raises
        ------
        SecurityError
            No key was given and none is at the default path, or it is unreadable.
        """
        key = self._signing_key
        if isinstance(key, signing.Ed25519PrivateKey):
            return key
        if key is None:
            from fedge.shared.paths import signing_key_path

            key = signing_key_path()
        if not Path(key).is_file():
            raise SecurityError(
                f"no operator signing key at {key}: channel changes are signed with it",
                hint="pass --signing-key, or create one with `fedge keys create`",
            )
        self._signing_key = signing.load_private_key(key)
        return self._signing_key

    def adopt_signing_key_beside(self, public_key: Path | str) -> None:
        """Without an explicit key, sign with the private key stored beside ``public_key``.

        ``fedge keys create`` writes ``signing.key`` and ``signing.pub`` side by side; the
        operator who publishes with one holds the other.
        """
        sibling = Path(public_key).with_suffix(".key")
        if self._signing_key is None and sibling.is_file():
            self._signing_key = sibling

    def statement(self, channel: str) -> SignedStatement | None:
        """The latest signed statement for ``channel`` (None: never signed, or emptied)."""
        with contextlib.closing(self.connect()) as conn:
            row = conn.execute(
                "SELECT version, statement, signature FROM channel_statements WHERE channel = ? "
                "ORDER BY id DESC LIMIT 1",
                (channel,),
            ).fetchone()
            if row is None or row["version"] != _current(conn, channel):
                return None
        return SignedStatement(row["statement"], row["signature"])

    def refresh(self, channel: str) -> ChannelStatement:
        """Sign the channel's current assignment again with a new expiry (same version, action).

        Raises
        ------
        RegistryError
            The channel has no version.
        """
        check_channel(channel)
        key = self.signing_key()
        with self.locked(), contextlib.closing(self.connect()) as conn, transaction(conn):
            version = _current(conn, channel)
            if version is None:
                raise RegistryError(f"channel {channel!r} has no version to sign")
            row = conn.execute(
                "SELECT statement FROM channel_statements WHERE channel = ? ORDER BY id DESC "
                "LIMIT 1",
                (channel,),
            ).fetchone()
            action = "publish"
            if row is not None:
                previous = json.loads(row["statement"])
                if previous.get("version") == version:
                    action = str(previous.get("action", "publish"))
            return self._sign(conn, channel, version, action, key)

    def versions_seen_by(self, channels: tuple[str, ...]) -> set[str]:
        """Versions any of ``channels`` points at or ever pointed at (what a device may fetch)."""
        if not channels:
            return set()
        marks = ",".join("?" * len(channels))
        with contextlib.closing(self.connect()) as conn:
            rows = conn.execute(
                f"SELECT DISTINCT version FROM channel_history WHERE channel IN ({marks})",
                channels,
            ).fetchall()
        return {str(r[0]) for r in rows}

    def _check_not_older(
        self, conn: sqlite3.Connection, channel: str, version: str, rollback: bool
    ) -> None:
        current = _current(conn, channel)
        if current is None or rollback:
            return
        if _release(conn, version) < _release(conn, current):
            raise RegistryError(
                f"version {version!r} was published before {current!r}, which channel "
                f"{channel!r} serves now: devices refuse a downgrade the operator did not sign",
                hint=f"to go back on purpose: `fedge registry promote {version} --channel "
                f"{channel} --rollback` (or `fedge registry rollback --channel {channel}`)",
            )

    def _sign(
        self,
        conn: sqlite3.Connection,
        channel: str,
        version: str,
        action: str,
        key: signing.Ed25519PrivateKey | None = None,
    ) -> ChannelStatement:
        """Sign and store the statement ``channel -> version`` (inside the caller's transaction)."""
        key = key or self.signing_key()
        row = conn.execute("SELECT * FROM versions WHERE version = ?", (version,)).fetchone()
        sequence = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM channel_statements")
        issued = datetime.now(UTC).replace(microsecond=0)
        statement = ChannelStatement(
            channel=channel,
            sequence=int(sequence.fetchone()[0]),
            version=version,
            release=_release(conn, version),
            bundle_id=row["bundle_id"],
            manifest_sha256=row["manifest_sha256"],
            tar_sha256=row["tar_sha256"],
            tar_size=int(row["tar_size"]),
            task=row["task"],
            action=action,
            issued_at=issued.isoformat(),
            expires_at=(issued + timedelta(days=self.statement_days)).isoformat(),
            key_fingerprint=signing.public_key_fingerprint(key),
        )
        signed = SignedStatement.sign(statement, key)
        conn.execute(
            "INSERT INTO channel_statements (id, channel, version, statement, signature) "
            "VALUES (?, ?, ?, ?, ?)",
            (statement.sequence, channel, version, signed.statement, signed.signature),
        )
        return statement

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


def _release(conn: sqlite3.Connection, version: str) -> int:
    """A version's release number: its publish order (SQLite rowid, never reused)."""
    row = conn.execute("SELECT rowid FROM versions WHERE version = ?", (version,)).fetchone()
    if row is None:
        raise RegistryError(f"version {version!r} is not in the registry")
    return int(row[0])


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
