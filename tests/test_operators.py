"""Operator and data-scientist credentials: grant, authenticate, revoke, file discipline."""

import json
import stat

import pytest

from fedge.server import operators
from fedge.shared.errors import ConfigError


def test_grant_authenticate_revoke(tmp_path):
    g = operators.grant(tmp_path, "alice", "scientist")
    o = operators.grant(tmp_path, "root", role="operator")
    assert g.token.startswith(operators.TOKEN_PREFIX) and g.token != o.token
    assert operators.authenticate(tmp_path, g.token) == operators.Operator("alice", "scientist")
    assert operators.authenticate(tmp_path, o.token).role == "operator"
    assert operators.authenticate(tmp_path, g.token + "x") is None
    assert operators.authenticate(tmp_path, "") is None
    assert operators.authenticate(tmp_path, "x" * 10_000) is None
    path = tmp_path / operators.OPERATORS_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert g.token not in text and o.token not in text  # only hashes on disk
    assert [u.name for u in operators.list_users(tmp_path)] == ["alice", "root"]
    operators.revoke_user(tmp_path, "alice")
    assert operators.authenticate(tmp_path, g.token) is None
    assert operators.authenticate(tmp_path, o.token) is not None
    with pytest.raises(ConfigError):
        operators.revoke_user(tmp_path, "alice")


def test_regrant_replaces_old_token(tmp_path):
    first = operators.grant(tmp_path, "bob")
    second = operators.grant(tmp_path, "bob", "operator")
    assert operators.authenticate(tmp_path, first.token) is None
    assert operators.authenticate(tmp_path, second.token).role == "operator"
    assert len(operators.list_users(tmp_path)) == 1


def test_bad_names_roles_and_corrupt_file(tmp_path):
    with pytest.raises(ConfigError):
        operators.grant(tmp_path, "../evil")
    with pytest.raises(ConfigError):
        operators.grant(tmp_path, "ok", role="admin")
    g = operators.grant(tmp_path, "carol")
    (tmp_path / operators.OPERATORS_NAME).write_text("{not json")
    assert operators.authenticate(tmp_path, g.token) is None  # fails closed
    (tmp_path / operators.OPERATORS_NAME).write_text(json.dumps({"format": "x"}))
    assert operators.authenticate(tmp_path, g.token) is None


def test_access_request_grant_install_flow(tmp_path):
    import subprocess
    import sys

    from fedge.shared.access_files import create_access_request
    from fedge.shared.processes import child_environment
    from fedge.shared.tls import certificate_fingerprint, ensure_server_certificate

    server = tmp_path / "server"
    tls = ensure_server_certificate(server / "tls", ["127.0.0.1"])
    laptop = tmp_path / "laptop"
    req = create_access_request("alice", "127.0.0.1:9092", laptop)
    assert stat.S_IMODE((laptop / "alice.access.key").stat().st_mode) == 0o600

    def fedge(*args):
        return subprocess.run([sys.executable, "-m", "fedge", *args], capture_output=True,
                              text=True, env=child_environment(), timeout=120)  # fmt: skip

    wrong = fedge("server", "grant", "alice", "--request", str(req.path), "--fingerprint",
                  "SHA256:AAAA", "--data-dir", str(server))  # fmt: skip
    assert wrong.returncode == 6 and not (server / operators.OPERATORS_NAME).exists()
    answer = tmp_path / "alice.access.json"
    ok = fedge("server", "grant", "alice", "--request", str(req.path), "--fingerprint",
               req.fingerprint, "--out", str(answer), "--data-dir", str(server))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    ca_fp = certificate_fingerprint(tls.ca_cert.read_bytes())
    assert ca_fp in ok.stdout
    # The answer travels in the clear, but the token in it does not.
    bad = fedge("access", "install", str(answer), "--ca-fingerprint", "SHA256:" + "00" * 32,
                "--folder", str(laptop))  # fmt: skip
    assert bad.returncode == 6 and not (laptop / "alice.token").exists()
    done = fedge("access", "install", str(answer), "--ca-fingerprint", ca_fp,
                 "--folder", str(laptop))  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = (laptop / "alice.token").read_text().strip()
    assert token not in answer.read_text()
    assert stat.S_IMODE((laptop / "alice.token").stat().st_mode) == 0o600
    assert operators.authenticate(server, token) == operators.Operator("alice", "scientist")
    # Someone else's key cannot open it.
    other = tmp_path / "other"
    create_access_request("alice", "127.0.0.1:9092", other)
    stolen = fedge("access", "install", str(answer), "--ca-fingerprint", ca_fp,
                   "--folder", str(other))  # fmt: skip
    assert stolen.returncode == 6 and "does not open" in stolen.stderr


def _seal_raw(request, plaintext: bytes, ca_pem: bytes, out) -> None:
    """An answer sealing arbitrary bytes to ``request``'s key: anyone holding it can do this."""
    import base64
    import os

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from fedge.shared import access_files

    access_files.write_access_answer(request, "scientist", "fedge_" + "A" * 43, ca_pem, out)
    data = json.loads(out.read_text())
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    shared = eph.exchange(X25519PublicKey.from_public_bytes(request.public_key))
    nonce = os.urandom(12)
    key = access_files._key(shared, request.public_key, eph_pub)
    sealed = AESGCM(key).encrypt(nonce, plaintext, request.name.encode())
    data["ephemeral_public_key"] = base64.b64encode(eph_pub).decode()
    data["nonce"] = base64.b64encode(nonce).decode()
    data["sealed_token"] = base64.b64encode(sealed).decode()
    out.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "plaintext", [b"\xff\xfe not utf-8", b"fedge_" + b"A" * 43 + b"\nevil", "fedge_é".encode()]
)
def test_access_install_refuses_a_sealed_value_that_is_not_a_token(tmp_path, plaintext):
    from fedge.shared.access_files import (
        create_access_request,
        install_access,
        read_access_request,
    )
    from fedge.shared.errors import SecurityError
    from fedge.shared.tls import certificate_fingerprint, ensure_server_certificate

    tls = ensure_server_certificate(tmp_path / "tls", ["127.0.0.1"])
    ca = tls.ca_cert.read_bytes()
    laptop = tmp_path / "laptop"
    req = create_access_request("alice", "127.0.0.1:9092", laptop)
    answer = tmp_path / "alice.access.json"
    _seal_raw(read_access_request(req.path), plaintext, ca, answer)
    with pytest.raises(SecurityError, match="not a fedge token"):
        install_access(answer, certificate_fingerprint(ca), laptop)
    assert not (laptop / "alice.token").exists()
    # A damaged private key is a one-line error too, not cryptography's ValueError.
    (laptop / "alice.access.key").write_bytes(b"\xff" * 5)
    with pytest.raises(SecurityError, match="not an access key"):
        install_access(answer, certificate_fingerprint(ca), laptop)


def test_access_files_nested_past_jsons_stack_are_refused(tmp_path):
    """A request or answer file of 64k nested lists escaped as a RecursionError traceback."""
    from fedge.shared.access_files import read_access_request
    from fedge.shared.errors import SecurityError

    path = tmp_path / "bob.access-request.json"
    path.write_text("[" * 30_000 + "]" * 30_000)
    with pytest.raises(SecurityError, match="not JSON"):
        read_access_request(path)
