"""Private by default, for real: TLS, enrolled sites, SecAgg+ with DP, a site dropping out."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_support import initial_weights, local_federation
from fedge.server.local_federation import LocalFederation
from fedge.shared.atomic import read_jsonl
from fedge.shared.checkpoint import load_checkpoint
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.processes import stop_process

pytestmark = pytest.mark.slow
SITES = ["digits#0/3", "digits#1/3", "digits#2/3"]
SECAGG = {"secagg": True, "secagg_num_shares": 3, "secagg_threshold": 2}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("private")


@pytest.fixture(scope="module")
def federation(work: Path) -> Any:
    with local_federation(work, SITES, secure=True) as fed:
        yield fed


def _config(work: Path, name: str, rounds: int, privacy: PrivacyConfig) -> RunConfig:
    init = work / "init.safetensors"
    if not init.exists():
        initial_weights(init)
    return RunConfig(
        num_rounds=rounds,
        min_clients=3,
        run_dir=str(work / name),
        init_weights=str(init),
        federated_eval=False,
        privacy=privacy,
    )


def test_secagg_without_noise_equals_plain_fedavg(federation: LocalFederation, work: Path) -> None:
    plain = federation.submit(_config(work, "plain", 1, PrivacyConfig()))
    secure = federation.submit(_config(work, "secagg", 1, PrivacyConfig(**SECAGG)))
    assert plain["privacy"]["tls"] and plain["privacy"]["supernode_auth"]
    assert secure["privacy"]["secagg"]["enabled"] and not plain["privacy"]["secagg"]["enabled"]
    a = load_checkpoint(work / "plain" / "checkpoints" / "round-0001.safetensors").state_dict
    b = load_checkpoint(work / "secagg" / "checkpoints" / "round-0001.safetensors").state_dict
    # SecAgg+ quantizes each value into 2^22 levels over [-8, 8]: a step of 3.8e-6 per site.
    step = 2 * 8.0 / 4194304
    for key in a:
        assert b[key].dtype == a[key].dtype
        diff = float(np.abs(a[key].numpy() - b[key].numpy()).max())
        assert diff <= 3 * len(SITES) * step, (key, diff)
    assert plain["final_accuracy"] == pytest.approx(secure["final_accuracy"], abs=0.01)


def test_secagg_with_site_dp_survives_a_site_killed_mid_round(
    federation: LocalFederation, work: Path
) -> None:
    privacy = PrivacyConfig(dp="site", noise_multiplier=0.1, clipping_norm=5.0, **SECAGG)
    cfg = _config(work, "dropout", 2, privacy)
    victim = federation.supernodes[federation.site_names[-1]]

    def kill_a_site(event: dict[str, Any]) -> None:
        if event.get("event") == "round-start" and event.get("round") == 1:
            stop_process(victim, timeout=1)

    summary = federation.submit(cfg, on_event=kill_a_site)
    assert summary["rounds"] == 2
    rows = read_jsonl(work / "dropout" / "metrics.jsonl")
    assert sum(len(r["failures"]) for r in rows) >= 1  # the dropped site is reported
    assert summary["failures"] >= 1
    dp = summary["privacy"]["dp"]
    assert dp["level"] == "site" and dp["epsilon"] > 0 and dp["accountant"] == "rdp"
    assert summary["privacy"]["secagg"]["reconstruction_threshold"] == 2
