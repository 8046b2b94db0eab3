"""Private by default, for real: TLS, enrolled sites, SecAgg+ with DP, a site dropping out."""

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from federation_support import initial_weights, local_federation

from fedge.client.warm_executor import MARKER_FORKED
from fedge.demo.loopback import LocalFederation
from fedge.server.events import Event
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.ml.checkpoint import load_checkpoint
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


def _config(
    work: Path, name: str, rounds: int, privacy: PrivacyConfig, min_clients: int = 3
) -> RunConfig:
    init = work / "init.safetensors"
    if not init.exists():
        initial_weights(init)
    return RunConfig(
        num_rounds=rounds,
        min_clients=min_clients,
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


def test_lora_with_dp_sgd_through_secagg_sends_only_adapters_and_head(
    federation: LocalFederation, work: Path
) -> None:
    from fedge.shared.ml.data import task_for_run
    from fedge.shared.ml.models import build_run_model, exchanged_keys

    # LoRA adapts a pretrained backbone: 3 epochs on the public split (~62 % test accuracy).
    backbone = _pretrained_backbone(work / "backbone.safetensors", epochs=3)
    # All three together through real SuperNodes: PEFT adapters, DP-SGD (Opacus) on each
    # site, SecAgg+ on the sum.
    private = PrivacyConfig(dp="record", noise_multiplier=1.0, clipping_norm=1.0, **SECAGG)
    cfg = _config(work, "lora-secagg", 2, private).replace(
        mode="lora", lora_rank=2, lora_alpha=4, lr=0.02, init_weights=str(backbone)
    )
    summary = federation.submit(cfg)

    assert summary["mode"] == "lora" and summary["privacy"]["secagg"]["enabled"]
    assert summary["rounds"] == 2 and summary["failures"] == 0
    # Measured in process with the same recipe: 0.62 -> 0.72 -> 0.78 (0.77-0.79 over three
    # noise draws; 0.83 without DP-SGD).
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.05
    dp = summary["privacy"]["dp"]
    assert dp["level"] == "record" and sorted(dp["per_site"]) == sorted(federation.site_names)
    # Opacus' accountant for the steps the sites reported (4.44 in process for these sites).
    assert 0 < dp["epsilon"] < 10
    # What each site sent is exactly the adapters and the head, a small share of the model.
    lora = build_run_model(cfg, task_for_run(cfg), load_weights=False)
    state = lora.state_dict()
    adapters = sum(state[k].numel() * state[k].element_size() for k in exchanged_keys(lora, "lora"))
    full = build_run_model(cfg.replace(mode="full"), task_for_run(cfg), load_weights=False)
    full_bytes = sum(v.numel() * v.element_size() for v in full.state_dict().values())
    assert all("lora_" in k or "modules_to_save" in k for k in exchanged_keys(lora, "lora"))
    rows = read_jsonl(work / "lora-secagg" / "metrics.jsonl")
    for row in rows:
        assert len(row["clients"]) == 3
        assert {c["bytes-up"] for c in row["clients"]} == {adapters}
        assert row["bytes_up"] == 3 * adapters < 0.2 * 3 * full_bytes


# The test below kills a site of the module's federation: it must stay the last one here
# that needs all three sites (pytest runs a module's tests in file order).
def test_secagg_with_site_dp_survives_a_site_killed_mid_round(
    federation: LocalFederation, work: Path
) -> None:
    privacy = PrivacyConfig(
        dp="site", noise_multiplier=0.1, clipping_norm=5.0, secagg_timeout=60.0, **SECAGG
    )
    # Two sites suffice for a round: after the kill the run goes on with the survivors.
    cfg = _config(work, "dropout", 2, privacy, min_clients=2)
    name = federation.site_names[-1]
    victim = federation.supernodes[name]
    log = work / "logs" / f"supernode-{name}.log"
    # Counted before the run starts: a SuperNode may receive round 1's first message before
    # the ServerApp's round-start event reaches this test.
    start = _tasks_started(log)

    def kill_during_local_training() -> None:
        # SecAgg+ stages per round: setup, share keys, then the one that trains. A site
        # killed after sharing its keys is the dropout SecAgg+ is built to survive.
        deadline = time.monotonic() + 600
        while _tasks_started(log) < start + 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop_process(victim, timeout=1)

    seen: list[dict[str, Any]] = []
    threading.Thread(target=kill_during_local_training, daemon=True).start()
    summary = federation.submit(cfg, on_event=seen.append)
    assert victim.poll() is not None  # the site really was killed
    failed = [e for e in seen if e["event"] == Event.SITE_FAILED]
    assert failed and {e["round"] for e in failed} == {1}  # the survivors carry round 2
    assert summary["rounds"] == 2
    rows = read_jsonl(work / "dropout" / "metrics.jsonl")
    assert len(rows[0]["failures"]) >= 1  # the dropped site is reported
    if rows[0]["clients"]:
        # Dropped after sharing its keys: SecAgg+ rebuilt the sum from the two survivors,
        # but Flower's DP wrapper drops a round with failures; fedge records that.
        assert len(rows[0]["clients"]) == 2
    else:
        # Dropped before its key shares reached the others: SecAgg+ halts the round.
        assert "secure aggregation halted" in rows[0]["failures"][0]
    assert rows[0]["aggregated"] is False
    # Either way the global model of round 1 is the starting one, and round 2 runs with
    # the two survivors.
    start = load_checkpoint(work / "init.safetensors").state_dict
    after_one = load_checkpoint(work / "dropout" / "checkpoints" / "round-0001.safetensors")
    for key, value in after_one.state_dict.items():
        assert torch.equal(value, start[key]), key
    assert len(rows[1]["clients"]) == 2 and rows[1]["aggregated"] is True
    assert rows[1]["server_eval"]["accuracy"] != rows[0]["server_eval"]["accuracy"]
    assert summary["failures"] >= 1
    dp = summary["privacy"]["dp"]
    assert dp["level"] == "site" and dp["epsilon"] > 0 and dp["accountant"] == "rdp"
    assert summary["privacy"]["secagg"]["reconstruction_threshold"] == 2


def _tasks_started(log: Path) -> int:
    """How many ClientApp tasks (one per message) the site's warm executor has started."""
    return log.read_text(errors="replace").count(MARKER_FORKED) if log.exists() else 0


def _pretrained_backbone(path: Path, epochs: int) -> Path:
    """The CNN trained centrally on digits' public split for a few epochs."""
    from fedge.shared.ml.checkpoint import save_checkpoint
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.models import build_model
    from fedge.shared.ml.training import make_loader, train
    from fedge.shared.preprocess import prepare

    torch.manual_seed(0)
    cfg = RunConfig()
    task = task_for_run(cfg)
    model = build_model(cfg.model, task)
    public = load_data("digits:public", task)
    loader = make_loader(prepare(public.x, task.preprocessing), public.y, 32, shuffle=True)
    train(model, loader, epochs, lr=0.05, device=torch.device("cpu"))
    save_checkpoint(path, model.state_dict(), 0, cfg.model, task, cfg.to_flower())
    return path
