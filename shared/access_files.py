"""Admitting a data scientist: request and answer files, as site enrollment does for sites.

The scientist's ``fedge access request`` makes an X25519 key pair and a request file
holding the public key; the operator's ``fedge server grant NAME --request FILE
--fingerprint FP`` checks the fingerprint the scientist read out, and answers with a
file that carries the server's CA certificate and the new control token sealed to the
scientist's key (X25519 + HKDF-SHA256 + AES-GCM). The answer can then travel by e-mail:
only the requester can open the token, and ``fedge access install`` checks the CA
fingerprint the operator read out before it stores anything.
"""

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedge.shared.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from fedge.shared.enrollment_files import (
    read_exchange_file,
    same_fingerprint,
    utc_now,
    validate_server_address,
)
from fedge.shared.errors import ConfigError, SecurityError

REQUEST_FORMAT = "fedge-access-request/1"
ANSWER_FORMAT = "fedge-access-answer/1"
_INFO = b"fedge-access/1"
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# What ``fedge.server.operators.grant`` issues: "fedge_" + URL-safe base64 (no newline).
_TOKEN = re.compile(r"fedge_[A-Za-z0-9_-]{16,250}")


def validate_user_name(name: str) -> str:
    """Return ``name`` if it is a valid user name (1-64 of letters, digits, ``_.@-``).

    Raises
    ------
    ConfigError
        When it is not.
    """
    if not isinstance(name, str) or not _USER_NAME.fullmatch(name):
        raise ConfigError(
            f"user name {name!r} is not valid: use 1-64 letters, digits, '_', '.', '@' or '-'"
        )
    return name


@dataclass(frozen=True)
class AccessRequest:
    """``NAME.access-request.json``: who asks, with which public key, for which server."""

    name: str
    public_key: bytes  # raw X25519
    fingerprint: str
    server_address: str
    path: Path


@dataclass(frozen=True)
class InstalledAccess:
    """What ``install_access`` stored: the token file and the CA to verify the server."""

    name: str
    role: str
    server_address: str
    token_path: Path
    ca_path: Path
    ca_fingerprint: str


def key_fingerprint(raw_public_key: bytes) -> str:
    """``SHA256:<base64>`` of the raw public key (read out by the scientist)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw_public_key).digest()).decode().rstrip(
        "="
    )


def _b64(data: dict[str, Any], key: str, path: Path) -> bytes:
    value = data.get(key)
    try:
        return base64.b64decode(str(value), validate=True)
    except (ValueError, TypeError) as e:
        raise SecurityError(f"{path} is malformed: {key!r}") from e


def create_access_request(name: str, server_address: str, folder: Path) -> AccessRequest:
    """Make the scientist's key pair (private key 0600) and request file in ``folder``."""
    validate_user_name(name)
    validate_server_address(server_address)
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:  # a file in the way, or no permission
        raise ConfigError(f"cannot make the access folder {folder}: {e.strerror}") from e
    key = X25519PrivateKey.generate()
    raw_private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    atomic_write_bytes(folder / f"{name}.access.key", raw_private, mode=0o600)
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    path = folder / f"{name}.access-request.json"
    fingerprint = key_fingerprint(public)
    atomic_write_json(
        path,
        {
            "format": REQUEST_FORMAT,
            "name": name,
            "public_key": base64.b64encode(public).decode(),
            "fingerprint": fingerprint,
            "server_address": server_address,
            "created_at": utc_now(),
        },
    )
    return AccessRequest(name, public, fingerprint, server_address, path)


def read_access_request(path: Path) -> AccessRequest:
    """Read a request; its fingerprint is recomputed from the key, never trusted."""
    data = read_exchange_file(path, "access request", REQUEST_FORMAT)
    public = _b64(data, "public_key", path)
    if len(public) != 32:
        raise SecurityError(f"{path}: the public key is not an X25519 key")
    fingerprint = key_fingerprint(public)
    if not same_fingerprint(str(data.get("fingerprint", "")), fingerprint):
        raise SecurityError(f"{path}: the fingerprint does not match the key (tampered?)")
    return AccessRequest(
        validate_user_name(str(data.get("name", ""))),
        public,
        fingerprint,
        validate_server_address(str(data.get("server_address", ""))),
        path,
    )


def _key(shared: bytes, recipient: bytes, ephemeral: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=_INFO + recipient + ephemeral).derive(shared)


def write_access_answer(
    request: AccessRequest, role: str, token: str, ca_pem: bytes, out_path: Path
) -> str:
    """Seal ``token`` to the requester's key and write the answer; returns the CA fingerprint."""
    from fedge.shared.tls import certificate_fingerprint

    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(request.public_key))
    nonce = os.urandom(12)
    sealed = AESGCM(_key(shared, request.public_key, ephemeral_public)).encrypt(
        nonce, token.encode("ascii"), request.name.encode()
    )
    ca_fingerprint = certificate_fingerprint(ca_pem)
    atomic_write_json(
        out_path,
        {
            "format": ANSWER_FORMAT,
            "name": request.name,
            "role": role,
            "server_address": request.server_address,
            "ca_certificate": ca_pem.decode("ascii"),
            "ca_fingerprint": ca_fingerprint,
            "ephemeral_public_key": base64.b64encode(ephemeral_public).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "sealed_token": base64.b64encode(sealed).decode(),
        },
    )
    return ca_fingerprint


def install_access(
    answer_path: Path, expected_ca_fingerprint: str, folder: Path
) -> InstalledAccess:
    """Check the CA fingerprint, open the token with this machine's key, store both (0600).

    Raises
    ------
    SecurityError
        On a CA fingerprint that differs from the one read out, or a token that does not
        open with the key of this request.
    """
    from fedge.shared.tls import certificate_fingerprint, load_ca_certificate

    data = read_exchange_file(answer_path, "access answer", ANSWER_FORMAT)
    name = str(data.get("name", ""))
    validate_user_name(name)
    ca_pem = str(data.get("ca_certificate", "")).encode("ascii", errors="replace")
    load_ca_certificate(ca_pem)
    ca_fingerprint = certificate_fingerprint(ca_pem)
    if not same_fingerprint(expected_ca_fingerprint, ca_fingerprint):
        raise SecurityError(
            f"{answer_path}: the CA fingerprint {ca_fingerprint} is not the one the operator "
            "read out; do not use this file"
        )
    key_path = folder / f"{name}.access.key"
    if not key_path.is_file():
        raise ConfigError(f"no access key for {name} in {folder}: run `fedge access request`")
    try:
        key = X25519PrivateKey.from_private_bytes(key_path.read_bytes())
    except ValueError as e:
        raise SecurityError(f"{key_path} is not an access key (not 32 raw bytes)") from e
    recipient = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    ephemeral = _b64(data, "ephemeral_public_key", answer_path)
    try:
        shared = key.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        token = AESGCM(_key(shared, recipient, ephemeral)).decrypt(
            _b64(data, "nonce", answer_path), _b64(data, "sealed_token", answer_path), name.encode()
        )
    except (InvalidTag, ValueError) as e:
        raise SecurityError(f"{answer_path}: the token does not open with this key") from e
    # Anyone holding the request's public key can seal something to it: what opens is
    # checked like any input before it is stored (not text, a newline, another format).
    try:
        token_text = token.decode("ascii")
    except UnicodeDecodeError:
        token_text = ""
    if not _TOKEN.fullmatch(token_text):
        raise SecurityError(f"{answer_path}: the sealed token is not a fedge token")
    token_path = folder / f"{name}.token"
    ca_path = folder / f"{name}.ca.crt"
    atomic_write_text(token_path, token_text + "\n", mode=0o600)
    atomic_write_bytes(ca_path, ca_pem)
    return InstalledAccess(
        name,
        str(data.get("role", "")),
        validate_server_address(str(data.get("server_address", ""))),
        token_path,
        ca_path,
        ca_fingerprint,
    )
