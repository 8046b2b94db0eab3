"""The two files of site enrollment, shared by the site and the server: request and approval.

A site sends ``SITE.enroll.json`` (its public key, never the private one) to the
operator; the operator's ``fedge server approve`` answers with ``SITE.approved.json``
(the server's CA certificate and the node id). Neither file holds a secret, but both
travel over channels nobody vouches for (e-mail, a USB stick), so each side checks a
fingerprint read out by the other: the operator the site key's, the site the CA's.
"""

import base64
import datetime
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.shared.errors import ConfigError, SecurityError
from fedge.shared.processes import split_address

REQUEST_FORMAT = "fedge-enrollment-request/1"
APPROVAL_FORMAT = "fedge-enrollment-approval/1"
REQUEST_SUFFIX = ".enroll.json"
APPROVAL_SUFFIX = ".approved.json"
# A request holds a public key, an approval a CA certificate: kilobytes, never megabytes.
MAX_FILE_BYTES = 1 << 20

# Site names become folder and file names on both sides: no dots, slashes or spaces.
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# The curves flower-supernode / `flwr supernode register` accept (NIST curves).
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def validate_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name (letters, digits, ``-``, ``_``; 1-64).

    Raises
    ------
    ConfigError
        When it is not.
    """
    if not _SITE_NAME.fullmatch(name):
        raise ConfigError(
            f"site name {name!r} is not valid: use 1-64 letters, digits, '-' or '_' "
            "(starting with a letter or digit)"
        )
    return name


def validate_server_address(address: str) -> str:
    """Return ``HOST:PORT`` unchanged if it parses (a ``ConfigError`` otherwise)."""
    split_address(address)
    return address


def load_site_public_key(openssh_line: str) -> ec.EllipticCurvePublicKey:
    """Parse a site's OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``).

    Raises
    ------
    SecurityError
        When it is not an EC key on a NIST curve (what Flower's SuperNode auth needs).
    """
    try:
        key = serialization.load_ssh_public_key(openssh_line.strip().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, UnicodeEncodeError) as e:
        raise SecurityError("the public key is not an OpenSSH public key line") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST_CURVES):
        raise SecurityError("the public key is not an ECDSA key on a NIST curve (P-256/384/521)")
    return key


def public_key_fingerprint(key: ec.EllipticCurvePublicKey | str) -> str:
    """``SHA256:<base64>`` of the key's SSH wire encoding, as ``ssh-keygen -lf site.pub`` shows.

    Parameters
    ----------
    key
        A public key, or its OpenSSH public key line.
    """
    loaded = load_site_public_key(key) if isinstance(key, str) else key
    blob = loaded.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    raw = base64.b64decode(blob.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def same_fingerprint(a: str, b: str) -> bool:
    """Compare two fingerprints as people type them.

    The ``SHA256:`` prefix is optional, and for hex fingerprints (the CA's) case,
    colons and spaces do not matter.
    """

    def norm(value: str) -> str:
        compact = value.replace(" ", "").strip()
        if compact[:7].lower() == "sha256:":
            compact = compact[7:]
        hex_digits = compact.replace(":", "")
        if re.fullmatch(r"(?i:sha256)?[0-9A-Fa-f]{64}", hex_digits):
            return hex_digits[-64:].lower()
        return compact

    return bool(a.strip()) and norm(a) == norm(b)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string with seconds (``...Z``)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class EnrollmentRequest:
    """``SITE.enroll.json``: what a site asks the operator to approve."""

    site: str
    public_key: str  # OpenSSH public key line
    fingerprint: str  # SHA256:<base64> of public_key
    server_address: str  # HOST:PORT the site dials
    created_at: str
    path: Path | None = field(default=None, compare=False)  # where the file lies (not in it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REQUEST_FORMAT,
            "site": self.site,
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "server_address": self.server_address,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Approval:
    """``SITE.approved.json``: the operator's answer, installed by the site."""

    site: str
    fingerprint: str  # the site key the SuperLink now accepts
    node_id: int
    server_address: str
    ca_certificate: str  # PEM of the CA that issued the SuperLink's certificate
    ca_fingerprint: str  # SHA256:AB:CD:... of the CA certificate (DER)
    approved_at: str
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": APPROVAL_FORMAT,
            "site": self.site,
            "fingerprint": self.fingerprint,
            "node_id": self.node_id,
            "server_address": self.server_address,
            "ca_certificate": self.ca_certificate,
            "ca_fingerprint": self.ca_fingerprint,
            "approved_at": self.approved_at,
        }


def _read_json(path: Path, what: str, expected_format: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    # A request comes from a site, an approval from the operator: bounded before it is read.
    if path.stat().st_size > MAX_FILE_BYTES:
        raise SecurityError(f"{path} is too large to be a {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SecurityError(f"{path} is not a valid {what} (not JSON)") from e
    if not isinstance(data, dict) or data.get("format") != expected_format:
        raise SecurityError(f"{path} is not a {what} (expected format {expected_format!r})")
    return data


def _field(data: dict[str, Any], key: str, path: Path, kind: type = str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
        raise SecurityError(
            f"{path} is malformed: field {key!r} is missing or not a {kind.__name__}"
        )
    return value


def read_request(path: Path | str) -> EnrollmentRequest:
    """Read and check an enrollment request; the fingerprint is recomputed, never trusted.

    Raises
    ------
    ConfigError
        When the file does not exist or names an invalid site or address.
    SecurityError
        When it is malformed, or its key or fingerprint does not check out.
    """
    path = Path(path)
    data = _read_json(path, "enrollment request", REQUEST_FORMAT)
    site = validate_site_name(_field(data, "site", path))
    public_key = _field(data, "public_key", path)
    fingerprint = public_key_fingerprint(public_key)
    if not same_fingerprint(_field(data, "fingerprint", path), fingerprint):
        raise SecurityError(f"{path}: the fingerprint does not match the public key (tampered?)")
    return EnrollmentRequest(
        site=site,
        public_key=public_key.strip(),
        fingerprint=fingerprint,
        server_address=validate_server_address(_field(data, "server_address", path)),
        created_at=_field(data, "created_at", path),
        path=path,
    )


def read_approval(path: Path | str) -> Approval:
    """Read and check an approval file (shape only; the site checks it against its key).

    Raises
    ------
    ConfigError
        When the file does not exist.
    SecurityError
        When it is malformed or its CA fingerprint does not match its CA certificate.
    """
    from fedge.shared.tls import certificate_fingerprint, load_ca_certificate

    path = Path(path)
    data = _read_json(path, "enrollment approval", APPROVAL_FORMAT)
    ca_pem = _field(data, "ca_certificate", path)
    if not ca_pem.isascii():
        raise SecurityError(f"{path} is malformed: the CA certificate is not PEM text")
    load_ca_certificate(ca_pem.encode("ascii"))
    ca_fingerprint = certificate_fingerprint(ca_pem.encode("ascii"))
    if not same_fingerprint(_field(data, "ca_fingerprint", path), ca_fingerprint):
        raise SecurityError(f"{path}: the CA fingerprint does not match its certificate")
    return Approval(
        site=validate_site_name(_field(data, "site", path)),
        fingerprint=_field(data, "fingerprint", path),
        node_id=_field(data, "node_id", path, int),
        server_address=validate_server_address(_field(data, "server_address", path)),
        ca_certificate=ca_pem,
        ca_fingerprint=ca_fingerprint,
        approved_at=_field(data, "approved_at", path),
        path=path,
    )
