"""The registry <-> device messages, defined once: channel statements, current version, status.

The registry (server, FastAPI) and the agent (device, torch-free, no pydantic)
both build and parse these frozen dataclasses; ``from_dict`` validates every
field a remote party chooses (names, lengths, finite numbers, printable text)
and raises ``ProtocolError``.

A *channel statement* is the operator's signed word on what a channel serves,
in the spirit of TUF's targets + timestamp metadata: which version, the sha256
and size of the exact tar, the bundle's task, a release number (publish order,
never reused), a sequence number (grows with every channel change, so an old
statement cannot be replayed), an action (``rollback`` marks an operator's
deliberate downgrade) and an expiry (a registry that keeps serving a frozen,
old statement is refused once it expires). It is canonical JSON signed with
the same Ed25519 key as the bundles.
"""

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedge.shared import signing
from fedge.shared.errors import ExitCode, FedgeError, SecurityError

STATEMENT_FORMAT = "fedge-channel/1"
API_PREFIX = "/v1"
HEALTH_VALUES = ("ok", "degraded", "failed", "no-model")
ACTIONS = ("publish", "promote", "rollback", "refresh")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
CHANNEL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DETAIL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_ERROR_CHARS = 2000
MAX_DETAIL_KEYS = 16
MAX_DETAIL_CHARS = 200
MAX_LATENCY_MS = 1e7
MAX_STATEMENT_BYTES = 4096
MAX_TAR_BYTES = 4 << 30


class ProtocolError(FedgeError, ValueError):
    """A message from the other side that does not follow the protocol."""

    exit_code = ExitCode.CONNECTION


def is_version(value: object) -> bool:
    """Whether ``value`` is a version name that is safe as a directory name."""
    return isinstance(value, str) and VERSION_RE.fullmatch(value) is not None


def is_channel(value: object) -> bool:
    """Whether ``value`` is a valid channel name."""
    return isinstance(value, str) and CHANNEL_RE.fullmatch(value) is not None


def bundle_download_path(version: str) -> str:
    """The API path of a version's tar (devices build it themselves; never trust a URL)."""
    if not is_version(version):
        raise ProtocolError(f"version {version!r} is not a valid version name")
    return f"{API_PREFIX}/bundles/{version}/bundle.tar"


def printable(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` safe for a terminal: control characters and lone surrogates shown as escapes."""
    out = []
    for ch in text[:limit]:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


# ---------------------------------------------------------------- field checks


def _text(data: Mapping[str, Any], key: str, limit: int, *, optional: bool = False) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string")
    if len(value) > limit:
        raise ProtocolError(f"{key} is longer than {limit} characters")
    # A line break or tab in an error message is fine; escape codes and surrogates are not.
    if not all(ch.isprintable() or ch in " \n\t" for ch in value):
        raise ProtocolError(f"{key} holds control characters or invalid unicode")
    return value


def _name(
    data: Mapping[str, Any], key: str, pattern: re.Pattern[str], *, optional: bool = False
) -> str | None:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"{key} {str(value)[:80]!r} is not a valid name")
    return value


def _int(data: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{key} must be an integer in [{low}, {high}]")
    return value


def _number(data: Mapping[str, Any], key: str, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{key} must be a number")
    value = float(value)
    if not math.isfinite(value) or not 0 <= value <= high:
        raise ProtocolError(f"{key} must be a finite number in [0, {high:g}]")
    return value


def _sha256(data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ProtocolError(f"{key} must be a lowercase hex sha256")
    return value


def _mapping(data: object, what: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{what} must be a JSON object")
    return data


def _time(data: Mapping[str, Any], key: str) -> datetime:
    raw = _text(data, key, 64)
    try:
        value = datetime.fromisoformat(str(raw))
    except ValueError as e:
        raise ProtocolError(f"{key} is not an ISO-8601 time") from e
    if value.tzinfo is None:
        raise ProtocolError(f"{key} has no time zone")
    return value


def parse_json(body: bytes | str, what: str) -> Any:
    """JSON without NaN/Infinity literals (Python's ``json`` accepts them by default)."""

    def refuse(constant: str) -> Any:
        raise ProtocolError(f"{what}: {constant} is not a JSON number")

    try:
        return json.loads(body, parse_constant=refuse)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"{what} is not valid JSON") from e


# ---------------------------------------------------------------- channel statements


@dataclass(frozen=True)
class ChannelStatement:
    """The operator's signed statement of what one channel serves (see the module docstring)."""

    channel: str
    sequence: int
    version: str
    release: int
    bundle_id: str
    manifest_sha256: str
    tar_sha256: str
    tar_size: int
    task: str
    action: str
    issued_at: str
    expires_at: str
    key_fingerprint: str
    format: str = STATEMENT_FORMAT

    @property
    def is_rollback(self) -> bool:
        """An operator's explicit, signed downgrade."""
        return self.action == "rollback"

    def expired(self, now: datetime | None = None) -> bool:
        return datetime.fromisoformat(self.expires_at) <= (now or datetime.now(UTC))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def canonical(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no spaces, UTF-8."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def from_dict(data: object) -> "ChannelStatement":
        data = _mapping(data, "channel statement")
        if data.get("format") != STATEMENT_FORMAT:
            raise ProtocolError(f"channel statement format is not {STATEMENT_FORMAT!r}")
        action = data.get("action")
        if action not in ACTIONS:
            raise ProtocolError(f"channel statement action must be one of {ACTIONS}")
        _time(data, "issued_at")
        _time(data, "expires_at")
        return ChannelStatement(
            channel=str(_name(data, "channel", CHANNEL_RE)),
            sequence=_int(data, "sequence", 1, 2**53),
            version=str(_name(data, "version", VERSION_RE)),
            release=_int(data, "release", 1, 2**53),
            bundle_id=str(_text(data, "bundle_id", 64)),
            manifest_sha256=_sha256(data, "manifest_sha256"),
            tar_sha256=_sha256(data, "tar_sha256"),
            tar_size=_int(data, "tar_size", 1, MAX_TAR_BYTES),
            task=str(_text(data, "task", 128)),
            action=str(action),
            issued_at=str(data["issued_at"]),
            expires_at=str(data["expires_at"]),
            key_fingerprint=str(_text(data, "key_fingerprint", 80)),
        )


@dataclass(frozen=True)
class SignedStatement:
    """A statement as it travels: its canonical JSON text and a base64 Ed25519 signature."""

    statement: str
    signature: str

    @staticmethod
    def sign(statement: ChannelStatement, key: signing.Ed25519PrivateKey) -> "SignedStatement":
        payload = statement.canonical()
        return SignedStatement(
            payload.decode("utf-8"), base64.b64encode(signing.sign(key, payload)).decode("ascii")
        )

    def verify(self, key: signing.Ed25519PublicKey) -> ChannelStatement:
        """The statement, if the signature holds under ``key``.

        Raises
        ------
        SecurityError
            Not signed by ``key`` (or the text was altered).
        ProtocolError
            Signed, but malformed.
        """
        payload = self.statement.encode("utf-8")
        if len(payload) > MAX_STATEMENT_BYTES:
            raise ProtocolError("channel statement is too large")
        try:
            signature = base64.b64decode(self.signature, validate=True)
        except ValueError as e:
            raise SecurityError("channel statement signature is not base64") from e
        if not signing.verify(key, payload, signature):
            raise SecurityError(
                "the channel statement is not signed by the key this device trusts; refusing it",
                hint="the registry (or someone between it and the device) altered what the "
                "operator signed",
            )
        statement = ChannelStatement.from_dict(parse_json(payload, "channel statement"))
        if statement.key_fingerprint != signing.public_key_fingerprint(key):
            raise SecurityError("the channel statement names a different signing key")
        return statement


# ---------------------------------------------------------------- API messages


@dataclass(frozen=True)
class CurrentVersion:
    """``GET /v1/channels/{channel}/current``: the version and the operator's signed statement."""

    channel: str
    version: str
    bundle_id: str
    tar_sha256: str
    tar_size: int
    download_path: str
    statement: str | None = None
    signature: str | None = None

    def signed(self) -> SignedStatement | None:
        if self.statement is None or self.signature is None:
            return None
        return SignedStatement(self.statement, self.signature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: object) -> "CurrentVersion":
        data = _mapping(data, "current version")
        return CurrentVersion(
            channel=str(_name(data, "channel", CHANNEL_RE)),
            version=str(_name(data, "version", VERSION_RE)),
            bundle_id=str(_text(data, "bundle_id", 64)),
            tar_sha256=_sha256(data, "tar_sha256"),
            tar_size=_int(data, "tar_size", 1, MAX_TAR_BYTES),
            download_path=str(_text(data, "download_path", 300)),
            statement=_text(data, "statement", MAX_STATEMENT_BYTES, optional=True),
            signature=_text(data, "signature", 200, optional=True),
        )


@dataclass(frozen=True)
class StatusReport:
    """``POST /v1/devices/me/status``: what a device reports on every poll."""

    channel: str
    active_version: str | None
    health: str
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    last_error: str | None = None
    detail: dict[str, str | int | float | bool | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: object) -> "StatusReport":
        data = _mapping(data, "status report")
        unknown = set(data) - {f for f in StatusReport.__dataclass_fields__}
        if unknown:
            raise ProtocolError(f"status report has unknown fields: {sorted(unknown)[:5]}")
        health = data.get("health")
        if health not in HEALTH_VALUES:
            raise ProtocolError(f"health must be one of {HEALTH_VALUES}")
        return StatusReport(
            channel=str(_name(data, "channel", CHANNEL_RE)),
            active_version=_name(data, "active_version", VERSION_RE, optional=True),
            health=str(health),
            latency_p50_ms=_number(data, "latency_p50_ms", MAX_LATENCY_MS),
            latency_p99_ms=_number(data, "latency_p99_ms", MAX_LATENCY_MS),
            last_error=_text(data, "last_error", MAX_ERROR_CHARS, optional=True),
            detail=_detail(data.get("detail")),
        )


def _detail(raw: object) -> dict[str, str | int | float | bool | None]:
    if raw is None:
        return {}
    raw = _mapping(raw, "detail")
    if len(raw) > MAX_DETAIL_KEYS:
        raise ProtocolError(f"detail has more than {MAX_DETAIL_KEYS} keys")
    out: dict[str, str | int | float | bool | None] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _DETAIL_KEY_RE.fullmatch(key):
            raise ProtocolError(f"detail key {str(key)[:40]!r} is not a valid name")
        if value is None or isinstance(value, bool):
            out[key] = value
        elif isinstance(value, int | float):
            if not math.isfinite(value) or abs(value) > 2**53:
                raise ProtocolError(f"detail.{key} must be a finite number")
            out[key] = value
        else:
            out[key] = _text(raw, key, MAX_DETAIL_CHARS)
    return out
