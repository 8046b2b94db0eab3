"""A real SuperLink and two SuperNodes on loopback: fine-tuning, checkpoints, bytes, resume."""

import json
from pathlib import Path
from typing import Any

import pytest
from federation_support import initial_weights, local_federation

from fedge.demo.loopback import LocalFederation
from fedge.shared.atomic import read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.errors import RunError
from fedge.shared.ml.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
)
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import build_run_model, exchanged_keys

pytestmark = pytest.mark.slow
SITES = ["digits#0/2", "digits#1/2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("federation")


@pytest.fixture(scope="module")
def federation(work: Path) -> Any:
    with local_federation(work, SITES) as fed:
        yield fed


def _config(work: Path, name: str, **changes: Any) -> RunConfig:
    init = work / "init.safetensors"
    if not init.exists():
        initial_weights(init)
    changes.setdefault("num_rounds", 2)
    return RunConfig(
        min_clients=2,
        run_dir=str(work / name),
        init_weights=str(init),
        federated_eval=False,
        **changes,
    )


def test_two_rounds_improve_accuracy_and_checkpoint_every_round(
    federation: LocalFederation, work: Path
) -> None:
    cfg = _config(work, "full")
    summary = federation.submit(cfg)
    assert summary["rounds"] == 2
    assert summary["clients"] == 2
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    run_dir = Path(cfg.run_dir)
    for server_round in (1, 2):
        ckpt = load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:04d}.safetensors")
        assert ckpt.round == server_round
        model = load_model_from_checkpoint(ckpt)
        assert sum(p.numel() for p in model.parameters()) > 0
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert len(row["clients"]) == 2 and row["failures"] == []
        assert all(c["bytes-down"] > 0 and c["bytes-up"] > 0 for c in row["clients"])
    assert json.loads((run_dir / "summary.json").read_text())["final_accuracy"] == pytest.approx(
        summary["final_accuracy"]
    )


def test_head_mode_sends_fewer_bytes_by_the_trainable_ratio(
    federation: LocalFederation, work: Path
) -> None:
    full_rows = read_jsonl(work / "full" / "metrics.jsonl")
    if not full_rows:
        pytest.skip("needs the full-mode run of the previous test")
    cfg = _config(work, "head", mode="head")
    federation.submit(cfg)
    head_rows = read_jsonl(work / "head" / "metrics.jsonl")
    head_bytes = head_rows[0]["clients"][0]["bytes-down"]
    full_bytes = full_rows[0]["clients"][0]["bytes-down"]
    task = task_for_run(cfg)

    def values(mode: str) -> int:
        model = build_run_model(cfg.replace(mode=mode), task, load_weights=False)
        state = model.state_dict()
        return sum(state[k].numel() for k in exchanged_keys(model, mode))

    assert head_bytes < full_bytes
    assert head_bytes / full_bytes == pytest.approx(values("head") / values("full"), rel=1e-6)


class _StopAfterRound(Exception):
    pass


def test_resume_after_an_interrupted_run_ends_at_the_configured_round(work: Path) -> None:
    cfg = _config(work, "resume")

    def stop_after_first_round(event: dict[str, Any]) -> None:
        if event.get("event") == "round" and event.get("round") == 1:
            raise _StopAfterRound

    with pytest.raises(_StopAfterRound), local_federation(work / "first", SITES) as fed:
        fed.submit(cfg, on_event=stop_after_first_round)
    run_dir = Path(cfg.run_dir)
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "round-0001.safetensors"
    assert not (run_dir / "summary.json").exists()

    with local_federation(work / "second", SITES) as fed:
        summary = fed.submit(cfg.replace(resume=True))
    assert summary["rounds"] == 2
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "round-0002.safetensors"
    assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_every_process_is_stopped_even_when_the_block_fails(work: Path) -> None:
    from fedge.shared.processes import _descendants, is_running

    with pytest.raises(RuntimeError), local_federation(work / "cleanup", SITES[:1]) as fed:
        processes = [proc for _, proc in fed.group.processes]
        family = [pid for proc in processes for pid in _descendants(proc.pid)]
        assert processes and family  # the SuperLink's SuperExec, the SuperNode's executor
        raise RuntimeError("test failure inside the block")
    assert all(proc.poll() is not None for proc in processes)
    assert not [pid for pid in family if is_running(pid)]


def test_a_site_whose_data_fails_does_not_stop_the_federation(work: Path) -> None:
    sites = ["digits#0/2", str(work / "no-such-folder")]
    cfg = _config(work, "broken-site", num_rounds=1)
    with local_federation(work / "broken", sites) as fed:
        summary = fed.submit(cfg)
        assert summary["rounds"] == 1 and summary["clients"] == 1
        rows = read_jsonl(Path(cfg.run_dir) / "metrics.jsonl")
        assert len(rows[0]["failures"]) == 1
        assert "does not exist" in rows[0]["failures"][0]

        corrupt = work / "corrupt.pt"
        corrupt.write_bytes(b"not a state dict")
        bad = _config(work, "corrupt-weights").replace(init_weights=str(corrupt))
        with pytest.raises(RunError, match="cannot read weights file"):
            fed.submit(bad)
