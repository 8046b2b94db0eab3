"""Sites enforce their own privacy policy and ledger in a real federation on loopback."""

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from federation_support import initial_weights, local_federation

from fedge.client.ledger import epsilon_of, load_ledger
from fedge.client.policy import update_policy
from fedge.demo.loopback import LocalFederation
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.errors import RunError

pytestmark = pytest.mark.slow
SITES = ["digits#0/2", "digits#1/2"]
RECORD = PrivacyConfig(dp="record", noise_multiplier=1.0, clipping_norm=1.0, delta=1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("site-policy")


@pytest.fixture(scope="module")
def federation(work: Path) -> Any:
    with local_federation(work, SITES) as fed:
        yield fed


def _config(work: Path, name: str, rounds: int, privacy: PrivacyConfig) -> RunConfig:
    init = work / "init.safetensors"
    if not init.exists():
        initial_weights(init)
    return RunConfig(num_rounds=rounds, min_clients=2, run_dir=str(work / name),
                     init_weights=str(init), federated_eval=False, server_eval=False,
                     privacy=privacy)  # fmt: skip


def _site(work: Path, name: str) -> Path:
    return work / "sites" / name


def test_policy_refusing_no_dp_makes_the_site_decline(
    federation: LocalFederation, work: Path
) -> None:
    update_policy(_site(work, "site-2") / "policy.toml", require=("record", "site"))
    events: list[dict[str, Any]] = []
    summary = federation.submit(_config(work, "no-dp", 1, PrivacyConfig()), events.append)
    assert summary["rounds"] == 1 and summary["sites"] == ["site-1"]  # the run went on
    [row] = read_jsonl(work / "no-dp" / "metrics.jsonl")
    assert any("refuses by its policy: dp = 'none'" in f for f in row["failures"]), row
    assert any(
        e.get("event") == "site-failed" and "refuses by its policy" in str(e.get("reason"))
        for e in events
    )
    assert not (_site(work, "site-2") / "privacy-ledger.json").exists()  # nothing released


def test_lifetime_budget_stops_a_site_in_its_second_run(
    federation: LocalFederation, work: Path
) -> None:
    # site-2 refused the no-DP run, so its ledger holds only what follows.
    ledger = _site(work, "site-2") / "privacy-ledger.json"
    first = federation.submit(_config(work, "dp-1", 2, RECORD))
    # The model card's record alone recomputes epsilon: each site's rate, steps and rounds.
    from opacus.accountants import RDPAccountant

    record = first["privacy"]["dp"]
    recomputed = []
    for row in record["per_site"].values():
        accountant = RDPAccountant()
        accountant.history = [
            (record["noise_multiplier"], row["sample_rate"], row["steps_per_round"] * row["rounds"])
        ]
        recomputed.append(accountant.get_epsilon(record["delta"]))
    assert sorted(record["per_site"]) == ["site-1", "site-2"]
    assert record["epsilon"] == pytest.approx(max(recomputed), rel=1e-9)
    entries = load_ledger(ledger)
    assert [e.dp for e in entries] == ["record", "record"]
    # Budget: what exactly 3 record-level rounds cost, composed across runs.
    budget = epsilon_of([*entries, entries[-1]], 1e-5) * (1 + 1e-9)
    update_policy(_site(work, "site-2") / "policy.toml", lifetime_epsilon=budget)
    summary = federation.submit(_config(work, "dp-2", 3, RECORD))
    rows = read_jsonl(work / "dp-2" / "metrics.jsonl")
    sites = [sorted(c["site"] for c in r["clients"]) for r in rows]
    assert sites == [["site-1", "site-2"], ["site-1"], ["site-1"]], sites
    assert any("lifetime epsilon would reach" in f for f in rows[1]["failures"]), rows[1]
    assert summary["rounds"] == 3
    after = load_ledger(ledger)
    assert len(after) == 3 and epsilon_of(after, 1e-5) <= budget


def test_ledger_is_intact_after_sigkill_during_a_round(
    federation: LocalFederation, work: Path
) -> None:
    ledger = _site(work, "site-1") / "privacy-ledger.json"
    start = len(load_ledger(ledger))
    victim = federation.supernodes["site-1"]
    killed: list[int] = []

    def kill_when_the_round_is_recorded() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if len(json.loads(ledger.read_text())["entries"]) > start:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        # The whole site: SuperNode and its warm executor with the training ClientApp.
        for proc in federation.group.processes:
            if proc[0].endswith("site-1"):
                os.killpg(proc[1].pid, signal.SIGKILL)
                killed.append(proc[1].pid)

    thread = threading.Thread(target=kill_when_the_round_is_recorded)
    thread.start()
    cfg = _config(work, "killed", 1, RECORD).replace(min_clients=1)
    with contextlib.suppress(RunError):  # the round may end with no site left
        federation.submit(cfg)
    thread.join()
    assert victim.pid in killed
    entries = load_ledger(ledger)  # parses: never half-written
    assert len(entries) == start + 1 and entries[-1].dp == "record"
