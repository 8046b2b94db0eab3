"""Site enrollment: key pairs and request/approval files, and a real TLS SuperLink with
SuperNode authentication that admits an approved site and refuses everything else."""

import json
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedge.client.enrollment import (
    create_enrollment,
    find_approval,
    install_approval,
    install_ca,
    load_site_identity,
)
from fedge.server.enrollment import REVOKED, approve, list_sites, revoke
from fedge.shared.enrollment_files import public_key_fingerprint, read_request, same_fingerprint
from fedge.shared.errors import ConfigError, ConnectionFailed, SecurityError
from fedge.shared.processes import (
    ProcessGroup,
    child_environment,
    flower_tool,
    free_port,
    port_open,
    wait_until,
)
from fedge.shared.tls import TLSFiles, certificate_fingerprint, ensure_ca, ensure_server_certificate

ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files only (fast) ----------------------------------------------------------------


def test_enrollment_creates_a_private_key_that_flower_can_load(tmp_path: Path) -> None:
    request = create_enrollment("site-a", "fl.example.org:9092", out_dir=tmp_path)
    key_path, pub_path = tmp_path / "site.key", tmp_path / "site.pub"
    assert _mode(key_path) == 0o600
    assert _mode(tmp_path) == 0o700
    # The formats flower-supernode and `flwr supernode register` load.
    private = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    public = serialization.load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public == private.public_key()
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")

    data = json.loads(request.path.read_text())
    assert request.path.name == "site-a.enroll.json"
    assert data["site"] == "site-a" and data["server_address"] == "fl.example.org:9092"
    assert data["fingerprint"] == public_key_fingerprint(public)
    assert data["fingerprint"].startswith("SHA256:")
    assert "PRIVATE" not in request.path.read_text()
    assert read_request(request.path) == request

    identity = load_site_identity("site-a", tmp_path)
    assert not identity.approved and identity.server_address == "fl.example.org:9092"
    with pytest.raises(SecurityError, match="not approved"):
        identity.supernode_args()


def test_existing_key_is_kept_unless_forced(tmp_path: Path) -> None:
    first = create_enrollment("site-a", "localhost:9092", out_dir=tmp_path)
    with pytest.raises(SecurityError, match="already has a key"):
        create_enrollment("site-a", "localhost:9092", out_dir=tmp_path)
    assert load_site_identity("site-a", tmp_path).fingerprint == first.fingerprint
    second = create_enrollment("site-a", "localhost:9092", out_dir=tmp_path, force=True)
    assert second.fingerprint != first.fingerprint


@pytest.mark.parametrize("name", ["", "a b", "../x", "a.b", "-x", "x" * 65])
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError):
        create_enrollment(name, "localhost:9092", out_dir=tmp_path)


def test_bad_server_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        create_enrollment("site-a", "localhost", out_dir=tmp_path)


def test_tampered_or_malformed_requests_are_refused(tmp_path: Path) -> None:
    request = create_enrollment("site-a", "localhost:9092", out_dir=tmp_path / "a")
    other = create_enrollment("site-b", "localhost:9092", out_dir=tmp_path / "b")
    data = json.loads(request.path.read_text())

    swapped = tmp_path / "swapped.enroll.json"
    swapped.write_text(json.dumps({**data, "public_key": other.public_key}))
    with pytest.raises(SecurityError, match="does not match the public key"):
        read_request(swapped)
    not_json = tmp_path / "x.enroll.json"
    not_json.write_text("{nope")
    with pytest.raises(SecurityError, match="not JSON"):
        read_request(not_json)
    missing = tmp_path / "m.enroll.json"
    missing.write_text(json.dumps({k: v for k, v in data.items() if k != "public_key"}))
    with pytest.raises(SecurityError, match="public_key"):
        read_request(missing)
    rsa_like = tmp_path / "r.enroll.json"
    rsa_like.write_text(json.dumps({**data, "public_key": "ssh-ed25519 AAAAC3Nza"}))
    with pytest.raises(SecurityError):
        read_request(rsa_like)
    with pytest.raises(ConfigError, match="does not exist"):
        read_request(tmp_path / "absent.enroll.json")
    nested = tmp_path / "n.enroll.json"  # was a RecursionError traceback at the operator
    nested.write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(SecurityError, match="not JSON"):
        read_request(nested)
    huge = tmp_path / "h.enroll.json"  # was read whole, whatever its size
    huge.write_text(json.dumps({**data, "padding": "x" * (2 << 20)}))
    with pytest.raises(SecurityError, match="over 65536 bytes"):
        read_request(huge)


def _fake_approval(tmp_path: Path, request_path: Path, fingerprint: str) -> Path:
    """An approval as `fedge server approve` writes it, without a SuperLink."""
    ca_cert, _ = ensure_ca(tmp_path / "ca")
    approval = {
        "format": "fedge-enrollment-approval/1",
        "site": json.loads(request_path.read_text())["site"],
        "fingerprint": fingerprint,
        "node_id": 42,
        "server_address": "localhost:9092",
        "ca_certificate": ca_cert.read_text(),
        "ca_fingerprint": certificate_fingerprint(ca_cert),
        "approved_at": "2026-01-01T00:00:00Z",
    }
    path = tmp_path / "site-a.approved.json"
    path.write_text(json.dumps(approval))
    return path


def test_approval_is_installed_only_for_this_key_and_the_expected_ca(tmp_path: Path) -> None:
    site = tmp_path / "site"
    request = create_enrollment("site-a", "localhost:9092", out_dir=site)
    wrong_key = _fake_approval(tmp_path, request.path, "SHA256:somebody-elses-key")
    with pytest.raises(SecurityError, match="approves key"):
        install_approval(wrong_key, directory=site)

    path = _fake_approval(tmp_path, request.path, request.fingerprint)
    assert find_approval("site-a", [tmp_path], directory=site) == path
    with pytest.raises(SecurityError, match="tampered"):
        install_approval(path, expected_ca_fingerprint="SHA256:" + "AB:" * 32, directory=site)
    assert not (site / "ca.crt").exists()

    ca_fp = certificate_fingerprint(tmp_path / "ca" / "ca.crt")
    identity = install_approval(path, expected_ca_fingerprint=ca_fp.lower(), directory=site)
    assert identity.approved and identity.node_id == 42
    assert identity.ca_fingerprint == ca_fp
    assert identity.supernode_args() == [
        "--root-certificates", str(site / "ca.crt"),
        "--auth-supernode-private-key", str(site / "site.key"),
    ]  # fmt: skip
    assert find_approval("site-a", [tmp_path], directory=site) is None

    # A CA fingerprint that does not match the certificate inside the file.
    data = json.loads(path.read_text())
    data["ca_fingerprint"] = "SHA256:" + "00:" * 31 + "00"
    path.write_text(json.dumps(data))
    with pytest.raises(SecurityError, match="does not match its certificate"):
        install_approval(path, directory=site)


def test_install_ca_refuses_a_leaf_certificate(tmp_path: Path) -> None:
    files = ensure_server_certificate(tmp_path / "tls", [])
    create_enrollment("site-a", "localhost:9092", out_dir=tmp_path / "site")
    with pytest.raises(SecurityError, match="not a CA"):
        install_ca("site-a", files.cert.read_bytes(), tmp_path / "site")
    path, fingerprint = install_ca("site-a", files.ca_cert.read_bytes(), tmp_path / "site")
    assert path.read_bytes() == files.ca_cert.read_bytes()
    assert same_fingerprint(fingerprint, certificate_fingerprint(files.ca_cert))


def test_site_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    create_enrollment("site-a", "localhost:9092", out_dir=tmp_path)
    (tmp_path / "site.key").chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        load_site_identity("site-a", tmp_path)


def test_approve_refuses_before_contacting_the_superlink(tmp_path: Path) -> None:
    """Checks that need no SuperLink: insecure server, fingerprint, duplicates, revoked keys."""
    files = ensure_server_certificate(tmp_path / "tls", [])
    data_dir = tmp_path / "data"
    request = create_enrollment("site-a", "localhost:9092", out_dir=tmp_path / "a")
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(SecurityError, match="--insecure"):
        approve(request.path, data_dir, dead, None)
    with pytest.raises(SecurityError, match="tampered"):
        approve(request.path, data_dir, dead, files.ca_cert, expected_fingerprint="SHA256:x")
    with pytest.raises(ConnectionFailed, match="no SuperLink is listening"):
        approve(request.path, data_dir, dead, files.ca_cert)
    with pytest.raises(ConnectionFailed):
        list_sites(data_dir, dead, files.ca_cert)

    registry = {
        "format": "fedge-site-registry/1",
        "sites": [
            {"name": "site-a", "fingerprint": request.fingerprint, "public_key": request.public_key,
             "node_id": 7, "status": "revoked", "approved_at": "t0", "revoked_at": "t1"},
            {"name": "site-b", "fingerprint": "SHA256:other", "public_key": "x", "node_id": 8,
             "status": "approved", "approved_at": "t0", "revoked_at": None},
        ],
    }  # fmt: skip
    (data_dir / "sites.json").write_text(json.dumps(registry))
    with pytest.raises(SecurityError, match="revoked"):
        approve(request.path, data_dir, dead, files.ca_cert)
    taken = create_enrollment("site-b", "localhost:9092", out_dir=tmp_path / "b")
    with pytest.raises(SecurityError, match="already enrolled with another key"):
        approve(taken.path, data_dir, dead, files.ca_cert)
    rows = list_sites(data_dir, dead, files.ca_cert, live=False)
    assert [(r.name, r.status) for r in rows] == [("site-a", REVOKED), ("site-b", "unknown")]
    with pytest.raises(ConfigError, match="no enrolled site"):
        revoke("site-c", data_dir, dead, files.ca_cert)
    with pytest.raises(ConfigError, match="revoked already"):
        revoke("site-a", data_dir, dead, files.ca_cert)


# --- a real SuperLink (slow) ----------------------------------------------------------


@dataclass
class Link:
    address: str
    tls: TLSFiles
    data_dir: Path
    group: ProcessGroup
    root: Path


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    """A SuperLink with TLS and SuperNode authentication on a free loopback port."""
    root = tmp_path_factory.mktemp("link")
    tls = ensure_server_certificate(root / "data" / "tls", [])
    port = free_port()
    command = [
        flower_tool("flower-superlink"),
        *tls.superlink_args(),
        "--enable-supernode-auth",
        "--database", str(root / "data" / "state.db"),
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    with ProcessGroup() as group:
        log = root / "superlink.log"
        proc = group.start("superlink", command, log, child_environment(ENV))
        wait_until(lambda: port_open("127.0.0.1", port), 60, "the SuperLink", proc, log)
        yield Link(f"127.0.0.1:{port}", tls, root / "data", group, root)


def _start_node(link: Link, name: str, security: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """A SuperNode with ``security`` flags that gives up after one failed connection."""
    command = [
        flower_tool("flower-supernode"),
        "--superlink", link.address,
        *security,
        "--host", "127.0.0.1",
        "--port", str(free_port()),
        "--max-retries", "0",
        "--max-wait-time", "10",
    ]  # fmt: skip
    log = link.root / f"supernode-{name}.log"
    return link.group.start(name, command, log, child_environment(ENV)), log


def _exit_code(proc: subprocess.Popen[bytes], timeout: float = 90) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _status(link: Link, name: str) -> str:
    rows = list_sites(link.data_dir, link.address, link.tls.ca_cert)
    return next(row.status for row in rows if row.name == name)


@pytest.fixture(scope="module")
def refused(link: Link) -> dict[str, tuple[int | None, str]]:
    """SuperNodes that must be turned away, started together to keep the module short."""
    stranger = create_enrollment("stranger", link.address, out_dir=link.root / "stranger")
    stranger_key = load_site_identity("stranger", link.root / "stranger").private_key_path
    other_ca, _ = ensure_ca(link.root / "other-ca")
    ca = ["--root-certificates", str(link.tls.ca_cert)]
    key = ["--auth-supernode-private-key", str(stranger_key)]
    cases = {
        "unenrolled": [*ca, *key],  # a well-formed key that was never approved
        "no-key": ca,
        # Plaintext to the TLS server (without a key: Flower itself refuses a key without TLS).
        "plaintext": ["--insecure"],
        # A site that trusts another CA does not talk to this server at all.
        "wrong-ca": ["--root-certificates", str(other_ca), *key],
    }
    started = {name: _start_node(link, name, args) for name, args in cases.items()}
    assert stranger.path is not None
    return {
        name: (_exit_code(proc), log.read_text(errors="replace"))
        for name, (proc, log) in started.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "evidence"),
    [
        ("unenrolled", "Failed to activate SuperNode"),  # [code: 2004]
        ("no-key", "must be registered"),  # [code: 2001]
        ("plaintext", "could not establish a connection"),
        ("wrong-ca", "could not establish a connection"),
    ],
)
def test_superlink_refuses(
    refused: dict[str, tuple[int | None, str]], case: str, evidence: str
) -> None:
    code, log = refused[case]
    assert code not in (None, 0), f"{case}: SuperNode did not exit with an error\n{log[-2000:]}"
    assert evidence in log, log[-2000:]
    assert "SuperNode ID:" not in log  # never admitted


@pytest.mark.slow
def test_approved_site_connects_and_revoked_site_is_cut_off(link: Link) -> None:
    site_dir = link.root / "hospital-a"
    request = create_enrollment("hospital-a", link.address, out_dir=site_dir)
    assert request.path is not None
    approved = approve(request.path, link.data_dir, link.address, link.tls.ca_cert)
    assert approved.approval_path.name == "hospital-a.approved.json"
    assert approved.ca_fingerprint == certificate_fingerprint(link.tls.ca_cert)
    assert approved.warnings == ()
    identity = install_approval(
        approved.approval_path, expected_ca_fingerprint=approved.ca_fingerprint, directory=site_dir
    )
    assert identity.node_id == approved.node_id
    assert _status(link, "hospital-a") == "never-connected"

    proc, log = _start_node(link, "hospital-a", identity.supernode_args())
    # Watch the log (cheap), then ask the SuperLink once (each `flwr` call costs seconds).
    wait_until(lambda: "SuperNode ID:" in log.read_text(), 90, "the approved SuperNode", proc, log)
    assert f"SuperNode ID: {approved.node_id}" in log.read_text()
    rows = list_sites(link.data_dir, link.address, link.tls.ca_cert)
    row = next(r for r in rows if r.name == "hospital-a")
    assert row.status == "online", log.read_text()[-2000:]
    assert row.fingerprint == request.fingerprint and row.last_seen is not None

    # Approving the same request again only rewrites the approval file.
    again = approve(request.path, link.data_dir, link.address, link.tls.ca_cert)
    assert again.node_id == approved.node_id

    revoked = revoke("hospital-a", link.data_dir, link.address, link.tls.ca_cert)
    assert revoked.status == REVOKED
    # The SuperLink drops the connected node at once.
    assert _exit_code(proc, timeout=60) is not None, "revoked SuperNode kept running"
    assert _status(link, "hospital-a") == REVOKED

    # The revoked key cannot come back, neither by restarting nor by approving it again.
    proc, log = _start_node(link, "hospital-a-again", identity.supernode_args())
    code = _exit_code(proc)
    assert code not in (None, 0), log.read_text()[-2000:]
    assert "Failed to activate SuperNode" in log.read_text()
    with pytest.raises(SecurityError, match="revoked"):
        approve(request.path, link.data_dir, link.address, link.tls.ca_cert)


@pytest.mark.slow
def test_approval_interrupted_after_flower_registered_the_key_recovers(link: Link) -> None:
    """A crash between Flower's register and fedge's save: approving again adopts the node."""
    from fedge.server.enrollment import _load_registry, _register

    request = create_enrollment("hospital-c", link.address, out_dir=link.root / "hospital-c")
    assert request.path is not None
    # What the crashed approval did: Flower has the key, sites.json does not.
    node_id = _register(
        request.public_key, "hospital-c", link.data_dir, link.address, link.tls.ca_cert
    )
    assert all(s["name"] != "hospital-c" for s in _load_registry(link.data_dir))
    approved = approve(request.path, link.data_dir, link.address, link.tls.ca_cert)
    assert approved.node_id == node_id
    entry = next(s for s in _load_registry(link.data_dir) if s["name"] == "hospital-c")
    assert entry["node_id"] == node_id and entry["fingerprint"] == request.fingerprint
    # Another key under a fresh name is not adopted by mistake: it registers normally.
    other = create_enrollment("hospital-d", link.address, out_dir=link.root / "hospital-d")
    assert other.path is not None
    assert approve(other.path, link.data_dir, link.address, link.tls.ca_cert).node_id != node_id
