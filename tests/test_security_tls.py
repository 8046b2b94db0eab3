"""The server's CA and certificate: creation, SANs, reuse, reissue, key modes, a real handshake."""

import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.shared.errors import ConfigError, SecurityError
from fedge.shared.tls import (
    TLSFiles,
    certificate_fingerprint,
    certificate_sans,
    default_sans,
    ensure_ca,
    ensure_server_certificate,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    cert_path, key_path = ensure_ca(tmp_path / "tls")
    assert _mode(key_path) == 0o600
    assert _mode(tmp_path / "tls") == 0o700
    cert = _load(cert_path)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp384r1"
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()
    before = (cert_path.read_bytes(), key_path.read_bytes())
    assert ensure_ca(tmp_path / "tls") == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == before


def test_ca_is_never_replaced_silently(tmp_path: Path) -> None:
    _, key_path = ensure_ca(tmp_path)
    key_path.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        ensure_ca(tmp_path)
    key_path.unlink()
    with pytest.raises(SecurityError, match="incomplete"):
        ensure_ca(tmp_path)
    # A key that is not the certificate's.
    _, other_key = ensure_ca(tmp_path / "other")
    key_path.write_bytes(other_key.read_bytes())
    key_path.chmod(0o600)
    with pytest.raises(SecurityError, match="is not the key of"):
        ensure_ca(tmp_path)


def test_server_certificate_covers_defaults_and_requested_names(tmp_path: Path) -> None:
    files = ensure_server_certificate(tmp_path, ["fl.example.org", "10.1.2.3", "0.0.0.0", "[::1]"])
    assert isinstance(files, TLSFiles)
    assert _mode(files.key) == 0o600
    sans = certificate_sans(files.cert)
    for name in [*default_sans(), "fl.example.org", "10.1.2.3"]:
        assert name.lower() in sans
    assert "0.0.0.0" not in sans
    assert sans.count("::1") == 1
    entries = _load(files.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("10.1.2.3") in entries.value.get_values_for_type(x509.IPAddress)
    assert "fl.example.org" in entries.value.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" not in entries.value.get_values_for_type(x509.DNSName)
    _load(files.cert).verify_directly_issued_by(_load(files.ca_cert))
    assert files.superlink_args() == [
        "--ssl-ca-certfile", str(files.ca_cert),
        "--ssl-certfile", str(files.cert),
        "--ssl-keyfile", str(files.key),
    ]  # fmt: skip


def test_server_certificate_is_reused_until_a_new_name_is_asked_for(tmp_path: Path) -> None:
    files = ensure_server_certificate(tmp_path, ["a.example", "10.0.0.1"])
    first = files.cert.read_bytes(), files.key.read_bytes()
    ensure_server_certificate(tmp_path, ["10.0.0.1"])  # a subset: nothing changes
    assert (files.cert.read_bytes(), files.key.read_bytes()) == first
    ca_before = files.ca_cert.read_bytes()
    ensure_server_certificate(tmp_path, ["b.example"])
    assert files.cert.read_bytes() != first[0]
    assert files.key.read_bytes() != first[1]
    assert files.ca_cert.read_bytes() == ca_before  # sites keep trusting the same CA
    assert "b.example" in certificate_sans(files.cert)


def test_certificate_from_another_ca_is_reissued(tmp_path: Path) -> None:
    files = ensure_server_certificate(tmp_path / "one", [])
    other = ensure_server_certificate(tmp_path / "two", [])
    files.cert.write_bytes(other.cert.read_bytes())
    files.key.write_bytes(other.key.read_bytes())
    ensure_server_certificate(tmp_path / "one", [])
    _load(files.cert).verify_directly_issued_by(_load(files.ca_cert))


@pytest.mark.parametrize("bad", ["host:9092", "bad host", "-x.example", "a..b", ""])
def test_malformed_san_is_a_config_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        ensure_server_certificate(tmp_path, [bad])


def test_fingerprint_is_openssl_style_sha256_of_der(tmp_path: Path) -> None:
    cert_path, _ = ensure_ca(tmp_path)
    der = _load(cert_path).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    expected = "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
    assert certificate_fingerprint(cert_path) == expected
    assert certificate_fingerprint(cert_path.read_bytes()) == expected
    with pytest.raises(SecurityError):
        certificate_fingerprint(b"not a certificate")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_tls_handshake_verifies_against_the_ca(tmp_path: Path, host: str) -> None:
    files = ensure_server_certificate(tmp_path, [])
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert, files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError) as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(timeout=10)
        listener.close()
    assert not errors


def test_a_client_that_trusts_another_ca_is_refused(tmp_path: Path) -> None:
    files = ensure_server_certificate(tmp_path / "server", [])
    other_ca, _ = ensure_ca(tmp_path / "other")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.cert, files.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(other_ca))
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ):
            client_ctx.wrap_socket(raw, server_hostname="localhost")
    finally:
        thread.join(timeout=10)
        listener.close()
