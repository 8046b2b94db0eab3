"""``fedge edge serve --workers 2 --agent-dir``: every worker process follows a version switch."""

import shutil
import sys
import time
from pathlib import Path

import httpx
from deploy_support import make_bundle, make_keys

from fedge.edge.device.activation import AgentDir
from fedge.shared.processes import ProcessGroup, free_port, wait_until


def _health(url: str) -> dict | None:
    try:
        # A fresh connection each time, so the kernel hands it to any worker.
        response = httpx.get(f"{url}/healthz", timeout=2, headers={"connection": "close"})
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_every_worker_switches_to_the_new_version(tmp_path: Path) -> None:
    private, public = make_keys(tmp_path)
    agent_dir = AgentDir(tmp_path / "device")
    agent_dir.prepare()
    for version in ("v1", "v2"):
        bundle = make_bundle(tmp_path / version, private, version, seed=len(version))
        shutil.copytree(bundle, agent_dir.version_dir(version))
    agent_dir.activate("v1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fedge", "edge", "serve",
               "--agent-dir", str(agent_dir.root), "--key", str(public),
               "--port", str(port), "--workers", "2"]  # fmt: skip
    log = tmp_path / "serve.log"
    with ProcessGroup() as group:
        proc = group.start("serve", command, log)
        wait_until(lambda: _health(url) is not None, 90, "edge serve", proc, log)
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            health = _health(url)
            if health is not None:
                seen[health["pid"]] = health["version"]
        assert len(seen) == 2, f"one worker answered every request: {seen}"
        assert set(seen.values()) == {"v1"}

        agent_dir.activate("v2")
        switched: dict[int, str] = {}
        deadline = time.monotonic() + 60
        while not (set(switched) >= set(seen) and set(switched.values()) == {"v2"}):
            assert time.monotonic() < deadline, f"workers did not all switch: {switched}"
            health = _health(url)
            if health is not None:
                switched[health["pid"]] = health["version"]
        response = httpx.post(f"{url}/predict", json={"inputs": [[[5] * 8] * 8]}, timeout=10)
        assert response.status_code == 200 and response.json()["version"] == "v2"
