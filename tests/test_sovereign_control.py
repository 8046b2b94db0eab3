"""The coordinator's control plane behind the fedge front: only credentials control it.

A real ``fedge server start`` on loopback (SuperLink on an internal port, the front on
the public one). An outsider holding ``ca.crt``, and an enrolled site's key, try every
control action with Flower's own ``flwr`` CLI and raw HTTP; an operator and an admitted
data scientist do what their role allows; enrolled sites still train.
"""

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedge.client.enrollment import create_enrollment
from fedge.server.operators import grant
from fedge.server.submit import store_control_token
from fedge.shared.processes import child_environment, flower_tool, free_port

pytestmark = pytest.mark.slow
APP = Path(__file__).resolve().parents[1] / "server" / "flower-app"


@dataclass
class Server:
    data_dir: Path
    address: str
    ca: Path
    control_address: str


def _fedge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_environment(),
        check=False,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("sovereign-server")
    port = free_port()
    started = _fedge(
        "server", "start", "--host", "127.0.0.1", "--port", str(port),
        "--registry-port", "0", "--data-dir", str(data_dir),
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "fedge server grant" in started.stdout  # how the operator gets a credential
        info = json.loads((data_dir / "server.json").read_text())
        yield Server(data_dir, f"127.0.0.1:{port}", data_dir / "tls" / "ca.crt",
                     info["control_address"])  # fmt: skip
    finally:
        _fedge("server", "stop", "--data-dir", str(data_dir))


def _flwr_home(root: Path, server: Server, token: str | None) -> Path:
    """A fresh FLWR_HOME that knows only the address and ``ca.crt`` (plus a token)."""
    home = root / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    ca = root / "ca.crt"
    ca.write_bytes(server.ca.read_bytes())
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{server.address}"\n'
        f'root-certificates = "{ca}"\n'
    )
    if token is not None:
        store_control_token(home, server.address, token)
    return home


def _flwr(home: Path, *args: str) -> tuple[bool, str]:
    """Run ``flwr ARGS target --format json``; (succeeded, output)."""
    env = child_environment({"FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1"})
    done = subprocess.run(
        [flower_tool("flwr"), *args, "--format", "json"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    text = done.stdout + done.stderr
    start, end = done.stdout.find("{"), done.stdout.rfind("}")
    try:
        answer = json.loads(done.stdout[start : end + 1]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    return done.returncode == 0 and answer.get("success") is True, text


def _control_attempts(home: Path, pub: Path) -> dict[str, tuple[bool, str]]:
    return {
        "list": _flwr(home, "supernode", "list", "target"),
        "register": _flwr(home, "supernode", "register", str(pub), "target"),
        "unregister": _flwr(home, "supernode", "unregister", "1", "target"),
        "run": _flwr(home, "run", str(APP), "target"),
        "stop": _flwr(home, "stop", "1", "target"),
        "ls": _flwr(home, "ls", "target"),
    }


def test_outsider_with_ca_cannot_control_the_federation(server: Server, tmp_path: Path) -> None:
    stranger = create_enrollment("stranger", server.address, out_dir=tmp_path / "stranger")
    pub = tmp_path / "stranger" / "site.pub"
    attempts = _control_attempts(_flwr_home(tmp_path, server, None), pub)
    for action, (ok, text) in attempts.items():
        assert not ok, f"outsider could {action}: {text[-400:]}"
    assert (
        stranger.fingerprint not in (server.data_dir / "sites.json").read_text(errors="replace")
        if (server.data_dir / "sites.json").exists()
        else True
    )
    # A made-up token is no better than none.
    bogus = _flwr(_flwr_home(tmp_path / "b", server, "fedge_" + "A" * 43), "supernode", "list",
                  "target")  # fmt: skip
    assert not bogus[0], bogus[1][-400:]


def test_front_routes_are_filtered(server: Server, tmp_path: Path) -> None:
    scientist = grant(server.data_dir, "sci", "scientist").token
    operator = grant(server.data_dir, "ops", "operator").token
    base = f"https://{server.address}"
    with httpx.Client(base_url=base, verify=str(server.ca), timeout=30) as client:
        control = "/v1/control/list-nodes"
        assert client.post(control, content=b"").status_code == 401
        # An enrolled site's identity headers are not a control credential.
        create_enrollment("site-x", server.address, out_dir=tmp_path / "site-x")
        site_headers = {
            "flwr-public-key": base64.b64encode(b"x" * 97).decode(),
            "flwr-signature": base64.b64encode(b"y" * 96).decode(),
            "flwr-timestamp": "2026-12-02T10:00:00Z",
        }
        assert client.post(control, content=b"", headers=site_headers).status_code == 401
        bearer = {"Authorization": f"Bearer {scientist}"}
        assert client.post(control, content=b"", headers=bearer).status_code == 403
        for route in ("register-node", "unregister-node"):
            assert client.post(f"/v1/control/{route}", headers=bearer).status_code == 403
        ops = {"Authorization": f"Bearer {operator}"}
        assert client.post(control, content=b"", headers=ops).status_code != 401
        assert client.post("/v1/control/create-invitation", headers=ops).status_code == 403
        assert client.post("/v1/runtime/pull-messages", headers=ops).status_code == 404
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 404
        assert client.post("/v1/fleet/../control/list-nodes").status_code in (401, 404)
        assert client.get("/health").status_code == 200
        assert _raw_status(server, "/v1/control/start-run", 1 << 40, operator) == 413
        # A run of any app package but the fedge app installed here never reaches the
        # SuperLink (whose ServerApp would import it in the coordinator's account).
        foreign = _start_run_body(tmp_path)
        proto = {"content-type": "application/protobuf"}
        for token in (scientist, operator):
            refused = client.post(
                "/v1/control/start-run",
                content=foreign,
                headers={**proto, "Authorization": f"Bearer {token}"},
            )
            assert refused.status_code == 403 and "fedge app" in refused.text
        # Fleet requests reach the SuperLink, whose own node authentication answers.
        assert client.post("/v1/fleet/pull-messages", content=b"").status_code not in (401, 404)


def _start_run_body(tmp_path: Path) -> bytes:
    """Flower's StartRunRequest carrying fedge's pyproject with another ServerApp."""
    import shutil

    from flwr.cli.build import build_fab_from_disk
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.proto.fab_pb2 import Fab

    from fedge.server.flower_app_config import APP_DIR

    app = tmp_path / "foreign-app"
    shutil.copytree(APP_DIR, app)
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        text.replace('serverapp = "fedge.server.app:app"', 'serverapp = "evil.server:app"')
    )
    content = build_fab_from_disk(app)
    return StartRunRequest(fab=Fab(content=content)).SerializeToString()


def _raw_status(server: Server, path: str, declared_length: int, token: str) -> int:
    """Send only the head of a request that declares a huge body; the answer's status."""
    host, port = server.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(server.ca))
    with (
        socket.create_connection((host, int(port)), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: {declared_length}\r\n\r\n".encode()
        )
        head = sock.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def test_operator_and_scientist_credentials_through_flwr(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "admin.token"
    granted = _fedge("server", "grant", "admin", "--role", "operator", "--out", str(out),
                     "--data-dir", str(server.data_dir))  # fmt: skip
    assert granted.returncode == 0, granted.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    token = out.read_text().strip()
    assert token not in (server.data_dir / "operators.json").read_text()
    listed = _fedge("server", "users", "--data-dir", str(server.data_dir))
    assert "admin" in listed.stdout and token not in listed.stdout
    home = _flwr_home(tmp_path / "op", server, token)
    ok, text = _flwr(home, "supernode", "list", "target")
    assert ok, text[-400:]
    sci = grant(server.data_dir, "alice", "scientist").token
    sci_home = _flwr_home(tmp_path / "sci", server, sci)
    assert _flwr(sci_home, "ls", "target")[0]
    assert not _flwr(sci_home, "supernode", "list", "target")[0]
    revoked = _fedge("server", "revoke-user", "admin", "--data-dir", str(server.data_dir))
    assert revoked.returncode == 0
    assert not _flwr(home, "supernode", "list", "target")[0]


def test_local_operator_commands_still_work(server: Server, tmp_path: Path) -> None:
    # `fedge server approve / clients` on the server machine go past the front on loopback.
    request = create_enrollment("hospital-z", server.address, out_dir=tmp_path / "z")
    done = _fedge("server", "approve", str(request.path), "--fingerprint", request.fingerprint,
                  "--data-dir", str(server.data_dir))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    listed = _fedge("server", "clients", "--data-dir", str(server.data_dir))
    assert "hospital-z" in listed.stdout, listed.stdout + listed.stderr
    assert os.path.exists(server.data_dir / "front.log")


def test_admitted_scientist_runs_and_resumes_through_the_front(tmp_path: Path) -> None:
    from federation_support import initial_weights, local_federation

    # Weights and the run folder inside the federation's folder, which the server allows.
    init = initial_weights(tmp_path / "fed" / "init.safetensors")
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = "digits"\nmodel = "cnn"\ninit-weights = "{init}"\nnum-rounds = 1\n'
        "min-clients = 2\nfederated-eval = false\n"
    )
    with local_federation(tmp_path / "fed", ["digits#0/2", "digits#1/2"], secure=True) as fed:
        assert fed.tls is not None and fed.control_address != fed.address
        token_file = tmp_path / "alice.token"
        token_file.write_text(grant(tmp_path / "fed" / "server", "alice").token + "\n")
        run_dir = tmp_path / "fed" / "alice-run"
        common = ["--server", fed.address, "--ca", str(fed.tls.ca_cert), "--token-file",
                  str(token_file)]  # fmt: skip
        first = _fedge("run", "--config", str(config), "--out", str(run_dir), *common, timeout=600)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert (run_dir / "checkpoints" / "round-0001.safetensors").exists()
        again = _fedge("run", "--resume", str(run_dir), "--rounds", "2", *common, timeout=600)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert (run_dir / "checkpoints" / "round-0002.safetensors").exists()
        # Without the credential the same submission is refused at the front.
        refused = _fedge("run", "--resume", str(run_dir), "--rounds", "3", "--server",
                         fed.address, "--ca", str(fed.tls.ca_cert), timeout=300)  # fmt: skip
        assert refused.returncode == 6 and "no valid control credential" in refused.stderr
        assert not (run_dir / "checkpoints" / "round-0003.safetensors").exists()


def _json_of(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    try:
        return dict(json.loads(text[start : end + 1])) if start >= 0 else {}
    except json.JSONDecodeError:
        return {}


def _listed(text: str) -> list[str]:
    """The run ids in ``flwr ls --format json`` output."""
    return [str(r.get("run-id")) for r in _json_of(text).get("runs", [])]


def test_a_scientist_stops_and_lists_only_their_own_runs(server: Server, tmp_path: Path) -> None:
    alice = _flwr_home(
        tmp_path / "alice", server, grant(server.data_dir, "alice2", "scientist").token
    )
    bob = _flwr_home(tmp_path / "bob", server, grant(server.data_dir, "bob2", "scientist").token)
    root = _flwr_home(tmp_path / "root", server, grant(server.data_dir, "root2", "operator").token)
    run_dir = server.data_dir / "runs" / "alice2"  # in the server's own runs folder
    ok, text = _flwr(alice, "run", str(APP), "target", "--run-config", f'run-dir="{run_dir}"')
    assert ok, text[-600:]
    run_id = str(_json_of(text)["run-id"])
    # (The run waits for sites that never come; it is stopped below.)
    ok, text = _flwr(bob, "ls", "target")
    assert ok and run_id not in _listed(text), text[-600:]
    assert not _flwr(bob, "ls", "--run-id", run_id, "target")[0]
    assert not _flwr(bob, "stop", run_id, "target")[0]
    ok, text = _flwr(alice, "ls", "target")
    assert ok and run_id in _listed(text), text[-600:]
    assert _flwr(root, "ls", "--run-id", run_id, "target")[0]  # the operator sees all
    ok, text = _flwr(alice, "stop", run_id, "target")
    assert ok, text[-600:]


def test_a_run_folder_outside_the_server_is_refused_with_a_clear_error(
    server: Server, tmp_path: Path
) -> None:
    token_file = tmp_path / "carol.token"
    token_file.write_text(grant(server.data_dir, "carol", "scientist").token + "\n")
    config = tmp_path / "run.toml"
    config.write_text("num-rounds = 1\nmin-clients = 1\nfederated-eval = false\n")
    evil = tmp_path / "evil"
    done = _fedge("run", "--config", str(config), "--out", str(evil), "--server", server.address,
                  "--ca", str(server.ca), "--token-file", str(token_file), timeout=300)  # fmt: skip
    assert done.returncode != 0
    assert "outside the folders this server lets a run use" in done.stderr, done.stderr[-1500:]
    assert not (evil / "run_config.json").exists()  # the server wrote nothing there
