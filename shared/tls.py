"""The server's TLS material: a private CA and a SuperLink certificate it signs, made once.

The SuperLink serves TLS with a certificate issued by a CA that fedge creates in the
server's data directory. Sites trust only that CA (it reaches them in the enrollment
bundle, see ``fedge.server.enrollment``), so nobody needs a public certificate
authority. Everything is ECDSA P-384, files are written atomically and private keys
with mode 0600; an existing CA is reused and never silently replaced, because every
enrolled site pins it.
"""

import datetime
import hashlib
import ipaddress
import logging
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.shared.atomic import atomic_write_bytes
from fedge.shared.errors import ConfigError, SecurityError

log = logging.getLogger(__name__)

CA_CERT_NAME = "ca.crt"
CA_KEY_NAME = "ca.key"
SERVER_CERT_NAME = "server.pem"
SERVER_KEY_NAME = "server.key"
TLS_DIR_NAME = "tls"

CA_VALIDITY_DAYS = 3650
# 825 days is the longest lifetime TLS clients (Apple, browsers) accept for a leaf.
SERVER_VALIDITY_DAYS = 825
# A server certificate this close to expiry is reissued on the next start.
RENEW_BEFORE_DAYS = 30

_DNS_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def tls_dir(data_dir: Path | str) -> Path:
    """Where the server keeps its CA and certificate: ``DATA_DIR/tls``."""
    return Path(data_dir) / TLS_DIR_NAME


@dataclass(frozen=True)
class TLSFiles:
    """Paths the SuperLink needs: ``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``."""

    ca_cert: Path
    cert: Path
    key: Path

    def superlink_args(self) -> list[str]:
        """The ``flower-superlink`` flags that enable TLS with these files."""
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.cert),
            "--ssl-keyfile",
            str(self.key),
        ]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: flower-superlink has no passphrase option; mode 0600 protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def check_private_file(path: Path) -> None:
    """Refuse a private key that others can read (as ssh does), naming the fix.

    Raises
    ------
    SecurityError
        When group or others have any permission on ``path``.
    """
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecurityError(
            f"private key {path} is accessible by other users (mode {mode:04o}); "
            f"run `chmod 600 {path}`"
        )


def certificate_fingerprint(cert: Path | bytes) -> str:
    """SHA-256 of a certificate's DER bytes, as ``openssl x509 -fingerprint -sha256`` shows it.

    Parameters
    ----------
    cert
        A PEM certificate file, or its PEM bytes.

    Returns
    -------
    str
        ``SHA256:AB:CD:...`` (upper-case hex pairs), to be read out and compared by people.
    """
    loaded = _load_certificate(cert)
    digest = hashlib.sha256(loaded.public_bytes(serialization.Encoding.DER)).hexdigest()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2)).upper()


def _load_certificate(cert: Path | bytes) -> x509.Certificate:
    data = cert.read_bytes() if isinstance(cert, Path) else cert
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        where = str(cert) if isinstance(cert, Path) else "the given data"
        raise SecurityError(f"{where} is not a PEM certificate") from e


def load_ca_certificate(data: bytes) -> x509.Certificate:
    """Parse PEM bytes that must be a CA certificate valid now.

    Raises
    ------
    SecurityError
        When the bytes are not a certificate, not a CA, or expired.
    """
    cert = _load_certificate(data)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise SecurityError("the certificate is not a CA certificate (basicConstraints CA:FALSE)")
    if cert.not_valid_after_utc <= _now():
        raise SecurityError(f"the CA certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert


def ensure_ca(directory: Path | str) -> tuple[Path, Path]:
    """Create the CA in ``directory`` once; reuse it afterwards.

    Parameters
    ----------
    directory
        Folder of the server's TLS files (e.g. ``DATA_DIR/tls``).

    Returns
    -------
    tuple[Path, Path]
        ``(ca_cert_path, ca_key_path)``; the key has mode 0600.

    Raises
    ------
    SecurityError
        When only one of the two files exists, they do not match, the CA has expired,
        or the key is readable by others. The CA is never replaced silently: every
        enrolled site trusts exactly this one.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT_NAME, directory / CA_KEY_NAME
    if cert_path.exists() or key_path.exists():
        _check_existing_ca(cert_path, key_path)
        return cert_path, key_path

    # Only the server's own user needs this folder; the CA key is its crown jewel.
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedge CA {socket.gethostname()}"[:64]),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA384())
    )
    # Key first: a crash between the two writes leaves a key without a cert, which
    # `_check_existing_ca` reports instead of a cert nobody can sign with.
    atomic_write_bytes(key_path, _key_pem(key), mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("created CA %s", cert_path)
    return cert_path, key_path


def _check_existing_ca(cert_path: Path, key_path: Path) -> None:
    """Refuse a half-present, mismatched, expired or exposed CA with the way out."""
    if not (cert_path.exists() and key_path.exists()):
        missing = key_path if cert_path.exists() else cert_path
        raise SecurityError(
            f"the CA in {cert_path.parent} is incomplete ({missing.name} is missing); restore "
            "it from a backup, or delete the folder to create a new CA (every site must then "
            "enroll again)"
        )
    check_private_file(key_path)
    cert = load_ca_certificate(cert_path.read_bytes())
    key = _load_private_key(key_path)
    if cert.public_key() != key.public_key():
        raise SecurityError(f"{key_path} is not the key of {cert_path}")


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise SecurityError(f"{path} is not an unencrypted PEM private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecurityError(f"{path} is not an EC private key")
    return key


def normalize_san(value: str) -> x509.GeneralName | None:
    """One ``--san`` value -> an IPAddress or DNSName entry (None for 0.0.0.0 / ::).

    Raises
    ------
    ConfigError
        When the value is neither an IP address nor a valid host name (e.g. ``host:port``).
    """
    text = value.strip().strip("[]")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is not None:
        # A wildcard bind address is not something clients dial; it has no place in a SAN.
        return None if ip.is_unspecified else x509.IPAddress(ip)
    name = text.lower().rstrip(".")
    labels = name.split(".")
    wildcard_ok = labels[0] == "*" and len(labels) > 2
    if not name or not all(
        _DNS_LABEL.fullmatch(label) for label in (labels[1:] if wildcard_ok else labels)
    ):
        raise ConfigError(
            f"--san {value!r} is not a host name or IP address (give it without a port)"
        )
    return x509.DNSName(name)


def default_sans() -> list[str]:
    """Names every server certificate carries: loopback and this machine's host name."""
    return ["localhost", "127.0.0.1", "::1", socket.gethostname()]


def _wanted_sans(sans: list[str]) -> list[x509.GeneralName]:
    wanted: list[x509.GeneralName] = []
    defaults = default_sans()
    for value in [*defaults, *sans]:
        try:
            entry = normalize_san(value)
        except ConfigError:
            if value in sans:
                raise
            continue  # an odd machine host name is no reason to refuse to start
        if entry is not None and entry not in wanted:
            wanted.append(entry)
    return wanted


def _san_entries(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(ext)


def certificate_sans(path: Path | str) -> list[str]:
    """The subject alternative names of a certificate, as strings (names and IPs).

    Parameters
    ----------
    path
        A PEM certificate file.

    Returns
    -------
    list[str]
        E.g. ``["localhost", "myhost", "127.0.0.1", "::1"]``, in certificate order.
    """
    out: list[str] = []
    for entry in _san_entries(_load_certificate(Path(path))):
        if isinstance(entry, x509.DNSName | x509.IPAddress):
            out.append(str(entry.value))
    return out


def ensure_server_certificate(directory: Path | str, sans: list[str]) -> TLSFiles:
    """Make sure ``directory`` holds a CA and a SuperLink certificate that covers ``sans``.

    The existing certificate is reused when it was signed by this CA, matches its key,
    covers every requested name (plus ``default_sans()``) and is not within 30 days of
    expiry; otherwise a new key and certificate are issued. Sites keep working across a
    reissue because they trust the CA, not the server certificate.

    Parameters
    ----------
    directory
        Folder of the server's TLS files (e.g. ``DATA_DIR/tls``).
    sans
        Host names and IP addresses the sites dial (``--san``); ``0.0.0.0`` is ignored.

    Returns
    -------
    TLSFiles
        The CA certificate, server certificate and server key (mode 0600).

    Raises
    ------
    ConfigError
        When a SAN is malformed.
    SecurityError
        When the CA is unusable (see ``ensure_ca``).
    """
    directory = Path(directory)
    wanted = _wanted_sans(sans)
    ca_cert_path, ca_key_path = ensure_ca(directory)
    files = TLSFiles(ca_cert_path, directory / SERVER_CERT_NAME, directory / SERVER_KEY_NAME)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    reason = _reissue_reason(files, ca_cert, wanted)
    if reason is None:
        return files

    log.info("issuing a server certificate (%s)", reason)
    ca_key = _load_private_key(ca_key_path)
    key = _new_key()
    now = _now()
    not_after = min(
        now + datetime.timedelta(days=SERVER_VALIDITY_DAYS), ca_cert.not_valid_after_utc
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedge superlink")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )
    atomic_write_bytes(files.key, _key_pem(key), mode=0o600)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _reissue_reason(
    files: TLSFiles, ca_cert: x509.Certificate, wanted: list[x509.GeneralName]
) -> str | None:
    """Why the server certificate must be (re)issued, or None when it is fine as it is."""
    if not (files.cert.exists() and files.key.exists()):
        return "none yet"
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = _load_private_key(files.key)
    except (ValueError, SecurityError):
        return "the existing one is unreadable"
    if cert.public_key() != key.public_key():
        return "the certificate does not match its key"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return "the certificate was not issued by this CA"
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return "the certificate expires soon"
    have = _san_entries(cert)
    missing = [str(entry.value) for entry in wanted if entry not in have]
    if missing:
        return "new names: " + ", ".join(missing)
    check_private_file(files.key)
    return None
