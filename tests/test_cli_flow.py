"""The documented CLI flow, for real: server start, enroll, approve, accept, start, run, revoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedge.server.coordinator import STATE_FILE
from fedge.shared.processes import (
    _descendants,
    free_port,
    is_running,
    port_open,
    wait_until,
)

pytestmark = pytest.mark.slow


def fedge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "fedge", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=dict(os.environ),
    )
    assert done.returncode == 0, f"fedge {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def test_operator_and_site_flow(tmp_path: Path) -> None:
    data_dir = tmp_path / "server"
    port = free_port()
    server = f"127.0.0.1:{port}"
    registry_port = free_port()
    sites = {"site-a": "digits#0/2", "site-b": "digits#1/2"}
    try:
        started = fedge(
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--registry-port",
            str(registry_port),
            "--data-dir",
            str(data_dir),
            cwd=tmp_path,
        )
        assert "fedge client enroll" in started.stdout
        assert port_open("127.0.0.1", port)
        # `server start` waits for the SuperLink only; the registry API comes up after it.
        wait_until(lambda: port_open("127.0.0.1", registry_port), 120, "the registry API")
        state = json.loads((data_dir / STATE_FILE).read_text())
        pids = {"superlink": state["pid"], "registry": state["registry_pid"]}
        for name, data in sites.items():
            fedge("client", "enroll", "--server", server, "--name", name, cwd=tmp_path)
            request = Path(os.environ["FEDGE_HOME"]) / "sites" / name / f"{name}.enroll.json"
            fedge("server", "approve", str(request), "--data-dir", str(data_dir), cwd=tmp_path)
            approval = request.with_name(f"{name}.approved.json")
            ca_fingerprint = json.loads(approval.read_text())["ca_fingerprint"]
            fedge(
                "client",
                "enroll",
                "--accept",
                str(approval),
                "--ca-fingerprint",
                ca_fingerprint,
                cwd=tmp_path,
            )
            fedge("client", "start", "--name", name, "--data", data, cwd=tmp_path)
            pid_file = Path(os.environ["FEDGE_HOME"]) / "sites" / name / "supernode.pid"
            pids[name] = int(pid_file.read_text())
        config = tmp_path / "run.toml"
        config.write_text("num-rounds = 1\nmin-clients = 2\nfederated-eval = false\n")
        # The control API sits behind the fedge front: the operator's own credential.
        assert "fedge server grant admin --role operator" in started.stdout
        token = tmp_path / "admin.token"
        fedge("server", "grant", "admin", "--role", "operator", "--out", str(token),
              "--data-dir", str(data_dir), cwd=tmp_path)  # fmt: skip
        run = fedge(
            "run",
            "--config",
            str(config),
            "--server",
            server,
            "--out",
            "runs/run",  # relative: from the folder the server was started in
            "--ca",
            str(data_dir / "tls" / "ca.crt"),
            "--token-file",
            str(token),
            cwd=tmp_path,
        )
        assert "final accuracy" in run.stdout
        summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
        assert summary["clients"] == 2 and summary["privacy"]["tls"] is True
        assert summary["privacy"]["supernode_auth"] is True
        listed = fedge("server", "clients", "--data-dir", str(data_dir), cwd=tmp_path).stdout
        assert "site-a" in listed and "site-b" in listed and "online" in listed
        # Revocation through a server whose public port is the fedge front (the SuperLink
        # on loopback behind it): a node that is connected is cut off, not just new ones.
        assert state["front_pid"] and state["control_address"] != server
        fedge("server", "revoke", "site-b", "--data-dir", str(data_dir), cwd=tmp_path)
        listed = fedge("server", "clients", "--data-dir", str(data_dir), cwd=tmp_path).stdout
        assert "revoked" in listed
        # The SuperLink forgets a revoked node; its SuperNode ends, the others stay.
        wait_until(lambda: not is_running(pids["site-b"]), 120, "site-b's SuperNode to end")

        # Stop everything, checked: each command says so, the ports close, no process stays.
        family = [*pids.values()] + [c for pid in pids.values() for c in _descendants(pid)]
        assert [n for n, pid in pids.items() if not is_running(pid)] == ["site-b"]
        for name in sites:
            stopped = fedge("client", "stop", "--name", name, cwd=tmp_path)
            assert f"stopped site {name}" in stopped.stdout
        stopped = fedge("server", "stop", "--data-dir", str(data_dir), cwd=tmp_path)
        assert f"stopped the SuperLink of {data_dir.resolve()}" in stopped.stdout
        assert not port_open("127.0.0.1", port)
        assert not port_open("127.0.0.1", registry_port)
        assert [pid for pid in family if is_running(pid)] == []
        again = fedge("server", "stop", "--data-dir", str(data_dir), cwd=tmp_path)
        assert "no SuperLink was running" in again.stdout
        again = fedge("client", "stop", "--name", "site-a", cwd=tmp_path)
        assert "site site-a is not running" in again.stdout
    finally:
        # Only reached with work left when an assertion above failed: clean up, unchecked.
        for name in sites:
            subprocess.run(
                [sys.executable, "-m", "fedge", "client", "stop", "--name", name],
                capture_output=True,
                timeout=60,
            )
        subprocess.run(
            [sys.executable, "-m", "fedge", "server", "stop", "--data-dir", str(data_dir)],
            capture_output=True,
            timeout=60,
        )
