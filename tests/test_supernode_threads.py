"""Sites that share a machine split its cores: each site's ClientApps run with its share."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedge.client.supernode import SuperNodeSpec, supernode_environment
from fedge.demo import loopback
from fedge.demo.loopback import LocalFederation, threads_per_site
from fedge.shared.processes import ProcessGroup


def _spec(tmp_path: Path, threads: int) -> SuperNodeSpec:
    return SuperNodeSpec("127.0.0.1:1", "s", "digits#0/2", tmp_path, threads=threads)


def test_a_site_s_threads_reach_torch_in_its_processes(tmp_path: Path) -> None:
    env = supernode_environment(_spec(tmp_path, threads=1))
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
    code = "import torch; print(torch.get_num_threads())"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "1"


def test_threads_zero_keeps_torch_s_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    env = supernode_environment(_spec(tmp_path, threads=0))
    assert "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env
    with pytest.raises(ValueError, match="threads"):
        supernode_environment(_spec(tmp_path, threads=-1))


def test_threads_per_site_splits_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopback.os, "sched_getaffinity", lambda _pid: set(range(8)))
    assert [threads_per_site(n) for n in (1, 2, 3, 8, 20)] == [8, 4, 2, 1, 1]


def test_a_local_federation_gives_each_site_its_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[SuperNodeSpec] = []

    def start_supernode(spec: SuperNodeSpec, group: Any = None) -> object:
        started.append(spec)
        return object()

    monkeypatch.setattr(loopback, "start_supernode", start_supernode)
    monkeypatch.setattr(loopback.os, "sched_getaffinity", lambda _pid: set(range(4)))
    with ProcessGroup() as group:
        fed = LocalFederation(tmp_path, ["digits#0/2", "digits#1/2"], group, secure=False)
        for name, data in zip(["a", "b"], fed.data_specs, strict=True):
            fed.start_site(name, data)
        LocalFederation(tmp_path, ["digits#0/1"], group, secure=False, threads=3).start_site(
            "c", "digits#0/1"
        )
    assert [s.threads for s in started] == [2, 2, 3]
