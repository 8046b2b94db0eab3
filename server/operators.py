"""Who may control the federation: operator and data-scientist credentials of the front.

The public port of a secured fedge server forwards the Flower Control API (register and
unregister nodes, list them, start and stop runs) only to a request that carries a valid
credential (``Authorization: Bearer <token>``). A credential is a random token, shown
once when the operator grants it; the server keeps only its SHA-256 in
``DATA_DIR/operators.json`` (0600, written atomically), so a stolen copy of that file
does not let anyone in. Tokens are 256 random bits, so one unsalted hash is enough
(there is nothing to brute-force, unlike a password).

Roles: ``operator`` may do everything the Control API offers; ``scientist`` may start,
stop, list and follow runs but not register, unregister or list nodes (see
``fedge.server.front.allowed``).
"""

import hashlib
import hmac
import os
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.shared.access_files import validate_user_name
from fedge.shared.atomic import atomic_write_json, exclusive_lock, read_json_object
from fedge.shared.enrollment_files import utc_now
from fedge.shared.errors import ConfigError, SecurityError

__all__ = [
    "OPERATORS_NAME",
    "ROLES",
    "TOKEN_PREFIX",
    "Grant",
    "Operator",
    "UserRow",
    "authenticate",
    "grant",
    "list_users",
    "revoke_user",
    "token_fingerprint",
    "validate_user_name",
]

OPERATORS_NAME = "operators.json"
OPERATORS_FORMAT = "fedge-operators/1"
ROLES = ("operator", "scientist")
TOKEN_PREFIX = "fedge_"
# Upper bound on a presented token: anything longer is refused before hashing.
MAX_TOKEN_CHARS = 256
MAX_OPERATORS_BYTES = 16 << 20  # about 200 bytes a user


@dataclass(frozen=True)
class Operator:
    """An authenticated caller of the control routes."""

    name: str
    role: str  # "operator" or "scientist"


@dataclass(frozen=True)
class Grant:
    """The result of ``grant``: the secret ``token`` exists only here, never on disk."""

    name: str
    role: str
    token: str
    fingerprint: str  # SHA256:<first 16 hex of the token hash>, safe to read out
    granted_at: str


@dataclass(frozen=True)
class UserRow:
    """One row of ``fedge server users`` (no secret, only a short fingerprint)."""

    name: str
    role: str
    fingerprint: str
    granted_at: str


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_fingerprint(token: str) -> str:
    """A short, non-secret fingerprint of a token, for ``users`` listings and logs."""
    return "SHA256:" + _hash(token)[:16]


def _locked(data_dir: Path) -> AbstractContextManager[None]:
    """Serialize read-modify-write of the credential file between fedge commands."""
    return exclusive_lock(data_dir / (OPERATORS_NAME + ".lock"))


def _load(data_dir: Path) -> list[dict[str, Any]]:
    path = Path(data_dir) / OPERATORS_NAME
    if not os.path.lexists(path):
        return []
    data = read_json_object(
        path, MAX_OPERATORS_BYTES, SecurityError, "fedge credential file", fmt=OPERATORS_FORMAT
    )
    users = data.get("users", [])
    if not isinstance(users, list):
        raise SecurityError(f"{path} is malformed: 'users' is not a list")
    return [u for u in users if isinstance(u, dict)]


def _save(data_dir: Path, users: list[dict[str, Any]]) -> None:
    atomic_write_json(
        Path(data_dir) / OPERATORS_NAME, {"format": OPERATORS_FORMAT, "users": users}, mode=0o600
    )


def grant(data_dir: Path, name: str, role: str = "scientist") -> Grant:
    """Create (or replace) the credential of ``name`` and return its token, once.

    Granting an existing name again issues a new token and invalidates the old one.

    Parameters
    ----------
    data_dir
        The server's data dir.
    name
        Who the credential is for (appears in the server's logs).
    role
        ``"operator"`` (everything) or ``"scientist"`` (runs only).

    Returns
    -------
    Grant
        With the secret ``token``: hand it over on a channel you trust; it is not stored.

    Raises
    ------
    ConfigError
        On an invalid name or role.
    """
    validate_user_name(name)
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    data_dir = Path(data_dir)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    granted_at = utc_now()
    with _locked(data_dir):
        users = [u for u in _load(data_dir) if u.get("name") != name]
        users.append(
            {"name": name, "role": role, "token_sha256": _hash(token), "granted_at": granted_at}
        )
        _save(data_dir, users)
    return Grant(name, role, token, token_fingerprint(token), granted_at)


def revoke_user(data_dir: Path, name: str) -> None:
    """Remove the credential of ``name``; the front refuses it from its next request.

    Raises
    ------
    ConfigError
        When no such user exists.
    """
    validate_user_name(name)
    data_dir = Path(data_dir)
    with _locked(data_dir):
        users = _load(data_dir)
        kept = [u for u in users if u.get("name") != name]
        if len(kept) == len(users):
            raise ConfigError(f"no user named {name!r}; see `fedge server users`")
        _save(data_dir, kept)


def authenticate(data_dir: Path, token: str) -> Operator | None:
    """The user a presented token belongs to, or None.

    Every stored hash is compared with ``hmac.compare_digest`` and the loop never stops
    early, so the time taken does not tell which entry (if any) came close. The file is
    read on every call, so a ``revoke-user`` or ``grant`` takes effect at once.
    """
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    if not token.isascii():
        return None
    presented = _hash(token)
    try:
        users = _load(Path(data_dir))
    except SecurityError:
        return None  # fail closed: a corrupt file admits nobody
    found: Operator | None = None
    for user in users:
        stored = str(user.get("token_sha256", ""))
        if len(stored) != len(presented):
            stored = "0" * len(presented)
        if hmac.compare_digest(stored, presented) and found is None:
            role = user.get("role")
            name = user.get("name")
            if role in ROLES and isinstance(name, str):
                found = Operator(name=name, role=role)
    return found


def list_users(data_dir: Path) -> list[UserRow]:
    """Every granted credential (name, role, short fingerprint, when), never the token."""
    return [
        UserRow(
            name=str(u.get("name")),
            role=str(u.get("role")),
            fingerprint="SHA256:" + str(u.get("token_sha256", ""))[:16],
            granted_at=str(u.get("granted_at", "")),
        )
        for u in _load(Path(data_dir))
    ]
