"""Real runs: the warm executor and the prompt reply poll are in use; a site leaves no process."""

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from federation_support import local_federation

from fedge.client.warm_executor import MARKER_FORKED, MARKER_READY
from fedge.shared.config import RunConfig
from fedge.shared.processes import _descendants, is_running, stop_process

pytestmark = pytest.mark.slow
SITES = ["digits#0/2", "digits#1/2"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _site_processes(supernode_pid: int) -> list[str]:
    return [_cmdline(pid) for pid in _descendants(supernode_pid)]


def test_a_real_run_uses_the_warm_executor_the_prompt_poll_and_the_data_cache(
    tmp_path: Path,
) -> None:
    cfg = RunConfig(
        num_rounds=2,
        min_clients=2,
        federated_eval=False,
        server_eval=False,
        run_dir=str(tmp_path / "run"),
    )
    events: list[dict[str, Any]] = []
    during_run: list[list[str]] = []
    with local_federation(tmp_path / "fed", SITES) as fed:

        def on_event(event: dict[str, Any]) -> None:
            events.append(event)
            if event.get("event") == "exchange":  # replies are in: the sites' processes now
                during_run.extend(_site_processes(p.pid) for p in fed.supernodes.values())

        fed.submit(cfg, on_event=on_event)
        logs = [(tmp_path / "fed" / "logs" / f"supernode-{n}.log") for n in fed.site_names]
        texts = [log.read_text(errors="replace") for log in logs]

    exchanges = [e for e in events if e.get("event") == "exchange"]
    assert len(exchanges) == 2 and all(e["poll"] == "prompt" for e in exchanges)
    assert all(len(e["replies"]) == 2 for e in exchanges)
    # Process counts: each SuperNode has fedge's executor below it and never a flwr-clientapp.
    assert during_run
    for processes in during_run:
        assert any("fedge.client.warm_executor" in p for p in processes), processes
        assert not any("flwr-clientapp" in p or "flower-superexec" in p for p in processes)
    for text in texts:
        assert MARKER_READY in text
        assert text.count(MARKER_FORKED) == 2  # one forked task per train message
        assert text.count("data loaded in") == 1 and text.count("data cached in") == 1


@pytest.mark.parametrize("how", ["sigkill", "client-stop"])
def test_a_site_leaves_no_process_when_its_supernode_goes(tmp_path: Path, how: str) -> None:
    """Mid-training: SIGKILL the SuperNode, or stop it as `fedge client stop` does."""
    cfg = RunConfig(
        num_rounds=1,
        min_clients=1,
        local_epochs=500,  # keeps the forked task training while the SuperNode goes
        federated_eval=False,
        server_eval=False,
        run_dir=str(tmp_path / "run"),
    )
    with local_federation(tmp_path / "fed", SITES[:1]) as fed:
        node = fed.supernodes["site-1"]
        log = tmp_path / "fed" / "logs" / "supernode-site-1.log"

        def submit() -> None:
            with contextlib.suppress(Exception):  # the run cannot end: its only site is gone
                fed.submit(cfg)

        threading.Thread(target=submit, daemon=True).start()
        deadline = time.monotonic() + 600
        while "data loaded" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.5)
        family = _descendants(node.pid)
        executors = [pid for pid in family if "fedge.client.warm_executor" in _cmdline(pid)]
        assert len(executors) >= 2, "the executor and its forked task"
        if how == "sigkill":
            os.kill(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        else:
            stop_process(node.pid)  # what `fedge client stop` does with the pid file's pid
        deadline = time.monotonic() + 30
        while any(is_running(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(pid, _cmdline(pid)) for pid in family if is_running(pid)]
        assert not left, left
