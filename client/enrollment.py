"""A site's side of enrollment: its key pair, its request, and installing the approval.

Flow (README, "Security: TLS and site enrollment"): ``fedge client enroll`` makes
the site's ECDSA P-384 key pair and ``SITE.enroll.json``; the operator's ``fedge
server approve`` answers with ``SITE.approved.json``, which ``fedge client enroll
--accept`` installs here after the site admin has compared the CA fingerprint with
the one the operator read out. ``fedge client start`` then runs the SuperNode with
this site's key and the CA. The private key never leaves this folder.

Files in ``site_dir(SITE)`` (folder mode 0700):
``site.key`` (OpenSSH private key, 0600), ``site.pub`` (OpenSSH public key),
``SITE.enroll.json`` (the request), ``ca.crt`` and ``site.json`` (after approval).
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.shared.atomic import atomic_write_bytes, atomic_write_json, read_json_object
from fedge.shared.enrollment_files import (
    APPROVAL_SUFFIX,
    MAX_FILE_BYTES,
    REQUEST_SUFFIX,
    EnrollmentRequest,
    public_key_fingerprint,
    read_approval,
    same_fingerprint,
    utc_now,
    validate_server_address,
    validate_site_name,
)
from fedge.shared.errors import SecurityError
from fedge.shared.paths import site_dir
from fedge.shared.tls import CA_CERT_NAME, certificate_fingerprint, check_private_file
from fedge.shared.tls import load_ca_certificate as _load_ca

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "site.key"
PUBLIC_KEY_NAME = "site.pub"
STATE_NAME = "site.json"

__all__ = [
    "EnrollmentRequest",
    "SiteIdentity",
    "create_enrollment",
    "find_approval",
    "install_approval",
    "install_ca",
    "load_site_identity",
]


@dataclass(frozen=True)
class SiteIdentity:
    """What ``fedge client start`` needs to connect a site's SuperNode."""

    site: str
    private_key_path: Path
    public_key_path: Path
    fingerprint: str  # SHA256:<base64> of the site's public key
    server_address: str  # HOST:PORT
    ca_cert_path: Path | None  # None until the approval is installed
    ca_fingerprint: str | None = None
    node_id: int | None = None

    @property
    def approved(self) -> bool:
        """True once the operator's approval (CA, node id) is installed."""
        return self.ca_cert_path is not None

    def supernode_args(self) -> list[str]:
        """The ``flower-supernode`` flags for TLS and SuperNode authentication.

        Raises
        ------
        SecurityError
            When the approval is not installed yet.
        """
        if self.ca_cert_path is None:
            raise SecurityError(
                f"site {self.site!r} is enrolled but not approved yet",
                hint=f"send {self.site}{REQUEST_SUFFIX} to the operator, then run "
                f"`fedge client enroll --accept {self.site}{APPROVAL_SUFFIX}`",
            )
        return [
            "--root-certificates",
            str(self.ca_cert_path),
            "--auth-supernode-private-key",
            str(self.private_key_path),
        ]


def _folder(site_name: str, directory: Path | str | None) -> Path:
    validate_site_name(site_name)
    return Path(directory) if directory is not None else site_dir(site_name)


def create_enrollment(
    site_name: str,
    server_address: str,
    out_dir: Path | str | None = None,
    force: bool = False,
) -> EnrollmentRequest:
    """Create the site's key pair and its enrollment request file.

    Parameters
    ----------
    site_name
        The site's name (letters, digits, ``-``, ``_``), unique in the federation.
    server_address
        ``HOST:PORT`` of the SuperLink as this site dials it (must be in its certificate).
    out_dir
        The site's folder; default ``fedge.shared.paths.site_dir(site_name)``.
    force
        Replace an existing key pair. The old key's approval no longer applies: the new
        request must be approved again (and the operator should revoke the old key).

    Returns
    -------
    EnrollmentRequest
        The request as written; ``.path`` is the file to send to the operator.

    Raises
    ------
    ConfigError
        When the site name or address is invalid.
    SecurityError
        When the site already has a key and ``force`` is false.
    """
    validate_server_address(server_address)
    folder = _folder(site_name, out_dir)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if private_path.exists() and not force:
        request_path = folder / f"{site_name}{REQUEST_SUFFIX}"
        raise SecurityError(
            f"site {site_name!r} already has a key in {folder}",
            hint=f"send {request_path} to the operator again, or pass --force to make a new "
            "key (it must then be approved again)",
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    # OpenSSH formats: the only ones flower-supernode (private) and `flwr supernode
    # register` (public) load. Unencrypted because flower-supernode cannot prompt.
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode("ascii")
        + f" fedge-site-{site_name}"
    )
    if force:
        # The installed approval belongs to the old key; keep nothing that points at it.
        (folder / STATE_NAME).unlink(missing_ok=True)
        (folder / CA_CERT_NAME).unlink(missing_ok=True)
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, (public_line + "\n").encode("ascii"))
    request = EnrollmentRequest(
        site=site_name,
        public_key=public_line,
        fingerprint=public_key_fingerprint(key.public_key()),
        server_address=server_address,
        created_at=utc_now(),
        path=folder / f"{site_name}{REQUEST_SUFFIX}",
    )
    atomic_write_json(folder / f"{site_name}{REQUEST_SUFFIX}", request.to_dict())
    log.info("created the key pair of site %s in %s", site_name, folder)
    return request


def _read_state(folder: Path) -> dict[str, object]:
    path = folder / STATE_NAME
    if not os.path.lexists(path):
        return {}
    return read_json_object(
        path, MAX_FILE_BYTES, SecurityError, "site state", hint="accept the approval file again"
    )


def load_site_identity(site_name: str, directory: Path | str | None = None) -> SiteIdentity:
    """Load the site's key paths, server address and (once approved) CA.

    Parameters
    ----------
    site_name
        The site's name.
    directory
        The site's folder; default ``site_dir(site_name)``.

    Returns
    -------
    SiteIdentity
        ``ca_cert_path`` is None while the approval is not installed.

    Raises
    ------
    SecurityError
        When the site has no key, the key is readable by others, or the key files
        do not belong together.
    """
    folder = _folder(site_name, directory)
    private_path, public_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if not private_path.exists() or not public_path.exists():
        raise SecurityError(
            f"site {site_name!r} is not enrolled on this machine (no key in {folder})",
            hint=f"run `fedge client enroll --server HOST:PORT --name {site_name}`",
        )
    check_private_file(private_path)
    try:
        private_key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SecurityError(f"{private_path} is not an unencrypted OpenSSH private key") from e
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{private_path} is not an ECDSA private key")
    fingerprint = public_key_fingerprint(public_path.read_text(encoding="ascii"))
    if fingerprint != public_key_fingerprint(private_key.public_key()):
        raise SecurityError(f"{public_path} is not the public key of {private_path}")

    state = _read_state(folder)
    approved = same_fingerprint(str(state.get("fingerprint", "")), fingerprint)
    ca_path = folder / CA_CERT_NAME
    address = str(state.get("server_address") or _requested_address(folder, site_name))
    if approved and ca_path.exists():
        node_id = state.get("node_id")
        return SiteIdentity(
            site=site_name,
            private_key_path=private_path,
            public_key_path=public_path,
            fingerprint=fingerprint,
            server_address=address,
            ca_cert_path=ca_path,
            ca_fingerprint=certificate_fingerprint(ca_path),
            node_id=node_id if isinstance(node_id, int) else None,
        )
    return SiteIdentity(site_name, private_path, public_path, fingerprint, address, None)


def _requested_address(folder: Path, site_name: str) -> str:
    """The server address in the site's own request ("" when it is unreadable)."""
    try:
        data = json.loads((folder / f"{site_name}{REQUEST_SUFFIX}").read_text(encoding="utf-8"))
        return str(data["server_address"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def install_ca(
    site_name: str, ca_cert_bytes: bytes, directory: Path | str | None = None
) -> tuple[Path, str]:
    """Install the server's CA certificate for ``site_name`` (``ca.crt`` in its folder).

    Returns
    -------
    tuple[Path, str]
        The installed file and its fingerprint (``SHA256:AB:CD:...``), which the site
        admin compares with the one the operator reads out.

    Raises
    ------
    SecurityError
        When the bytes are not a valid, unexpired CA certificate.
    """
    folder = _folder(site_name, directory)
    _load_ca(ca_cert_bytes)
    path = folder / CA_CERT_NAME
    atomic_write_bytes(path, ca_cert_bytes)
    return path, certificate_fingerprint(ca_cert_bytes)


def install_approval(
    approval_path: Path | str,
    expected_ca_fingerprint: str | None = None,
    directory: Path | str | None = None,
) -> SiteIdentity:
    """Install ``SITE.approved.json``: check it is for this site's key, then store CA and node id.

    Parameters
    ----------
    approval_path
        The file the operator's ``fedge server approve`` wrote.
    expected_ca_fingerprint
        The CA fingerprint the operator read out. When given, a mismatch is refused;
        when not, the caller must show ``identity.ca_fingerprint`` and ask.
    directory
        The site's folder; default ``site_dir(site)``.

    Returns
    -------
    SiteIdentity
        The now approved identity.

    Raises
    ------
    SecurityError
        When the file is malformed, is for another key or site, or the CA fingerprint
        does not match ``expected_ca_fingerprint``.
    """
    approval = read_approval(approval_path)
    identity = load_site_identity(approval.site, directory)
    if not same_fingerprint(approval.fingerprint, identity.fingerprint):
        raise SecurityError(
            f"{approval_path} approves key {approval.fingerprint}, but site "
            f"{approval.site!r} here has key {identity.fingerprint}",
            hint=f"send the current {approval.site}{REQUEST_SUFFIX} to the operator to approve",
        )
    if expected_ca_fingerprint is not None and not same_fingerprint(
        expected_ca_fingerprint, approval.ca_fingerprint
    ):
        raise SecurityError(
            f"the CA in {approval_path} has fingerprint {approval.ca_fingerprint}, not the "
            "one the operator gave; the file may have been tampered with",
            hint="do not use this file; ask the operator for the approval again",
        )
    folder = identity.private_key_path.parent
    install_ca(approval.site, approval.ca_certificate.encode("ascii"), folder)
    state = {
        "site": approval.site,
        "fingerprint": approval.fingerprint,
        "node_id": approval.node_id,
        "server_address": approval.server_address,
        "ca_fingerprint": approval.ca_fingerprint,
        "approved_at": approval.approved_at,
        "installed_at": utc_now(),
    }
    atomic_write_json(folder / STATE_NAME, state)
    return load_site_identity(approval.site, folder)


def find_approval(
    site_name: str, search: list[Path] | None = None, directory: Path | str | None = None
) -> Path | None:
    """An approval file for this site that is not installed yet (for ``fedge client start``).

    Looks for ``SITE.approved.json`` in ``search`` (default: the current directory and
    the site's folder). Returns None when there is none or it is already installed.
    """
    folder = _folder(site_name, directory)
    name = f"{site_name}{APPROVAL_SUFFIX}"
    state = _read_state(folder)
    for base in search if search is not None else [Path.cwd(), folder]:
        candidate = base / name
        if not candidate.is_file():
            continue
        try:
            approval = read_approval(candidate)
        except SecurityError:
            return candidate  # let install_approval report what is wrong with it
        installed = state.get("node_id") == approval.node_id and same_fingerprint(
            str(state.get("ca_fingerprint", "")), approval.ca_fingerprint
        )
        if not installed:
            return candidate
    return None
