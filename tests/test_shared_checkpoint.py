"""Checkpoints: round trip, atomic writes, finding the latest, refusing foreign files."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedge.shared.atomic import append_jsonl, atomic_write_json, read_jsonl
from fedge.shared.config import RunConfig
from fedge.shared.errors import ModelError
from fedge.shared.ml.checkpoint import (
    FINAL_MODEL,
    latest_checkpoint,
    load_checkpoint,
    load_model_from_checkpoint,
    resolve_checkpoint,
    round_path,
    save_checkpoint,
)
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import build_run_model
from fedge.shared.ml.training import predict_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(cfg: RunConfig) -> nn.Module:
    torch.manual_seed(0)
    return build_run_model(cfg, task_for_run(cfg))


def _save(path: Path, cfg: RunConfig, model: nn.Module, server_round: int = 1) -> Path:
    return save_checkpoint(
        path,
        model.state_dict(),
        server_round,
        cfg.model,
        task_for_run(cfg),
        cfg.to_flower(),
        {"accuracy": 0.5, "epsilon": None},
    )


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip_keeps_tensors_and_metadata(tmp_path: Path) -> None:
    cfg = RunConfig(model="cnn", mode="head", num_rounds=4)
    model = _model(cfg)
    path = _save(tmp_path / "c.safetensors", cfg, model, server_round=3)
    ckpt = load_checkpoint(path)
    assert ckpt.round == 3
    assert ckpt.model == "cnn"
    assert ckpt.task == task_for_run(cfg)
    assert RunConfig.from_flower(ckpt.config) == cfg
    assert ckpt.metrics == {"accuracy": 0.5, "epsilon": None}
    assert ckpt.path == path
    state = model.state_dict()
    assert set(ckpt.state_dict) == set(state)
    for key, value in state.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    assert _no_temp_files(tmp_path)


def test_model_from_checkpoint_reproduces_logits(tmp_path: Path) -> None:
    cfg = RunConfig(model="resnet18", image_size=32, mode="head")
    model = _model(cfg)
    with torch.no_grad():  # move BatchNorm statistics away from a fresh model's
        model.train()(torch.randn(8, 3, 32, 32))
    ckpt = load_checkpoint(_save(tmp_path / "c.safetensors", cfg, model))
    rebuilt = load_model_from_checkpoint(ckpt)
    assert not rebuilt.training
    assert [k for k, p in rebuilt.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(predict_logits(rebuilt, x), predict_logits(model, x))


def test_model_from_checkpoint_refuses_a_mismatched_config(tmp_path: Path) -> None:
    cfg = RunConfig(model="cnn")
    ckpt = load_checkpoint(_save(tmp_path / "c.safetensors", cfg, _model(cfg)))
    wrong = type(ckpt)(
        ckpt.state_dict,
        ckpt.round,
        "mlp",
        ckpt.task,
        RunConfig(model="mlp").to_flower(),
        ckpt.metrics,
        ckpt.path,
    )
    with pytest.raises(ModelError, match="does not fit model 'mlp'"):
        load_model_from_checkpoint(wrong)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    cfg = RunConfig(model="cnn")
    model = _model(cfg)
    path = _save(tmp_path / "c.safetensors", cfg, model, server_round=1)
    before = path.read_bytes()
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory
        save_checkpoint(path, {"a": shared, "b": shared}, 2, "cnn", task_for_run(cfg), {})
    assert path.read_bytes() == before
    assert load_checkpoint(path).round == 1
    assert _no_temp_files(tmp_path)


def test_latest_and_resolve(tmp_path: Path) -> None:
    cfg = RunConfig(model="mlp")
    model = _model(cfg)
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    run.mkdir()
    with pytest.raises(ModelError, match="holds no model"):
        resolve_checkpoint(run)
    for r in (2, 10, 9):
        _save(round_path(run, r), cfg, model, server_round=r)
    (run / "checkpoints" / "round-0011.safetensors.bak").write_text("not a checkpoint")
    (run / "checkpoints" / "notes.txt").write_text("ignored")
    assert round_path(run, 10).name == "round-0010.safetensors"
    assert latest_checkpoint(run) == round_path(run, 10)
    assert resolve_checkpoint(run) == round_path(run, 10)
    assert load_checkpoint(resolve_checkpoint(run)).round == 10
    _save(run / FINAL_MODEL, cfg, model, server_round=10)
    assert resolve_checkpoint(run) == run / FINAL_MODEL  # the final model wins
    single = round_path(run, 2)
    assert resolve_checkpoint(single) == single
    assert _no_temp_files(run)


def test_foreign_corrupt_and_missing_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="is not a fedge checkpoint"):
        load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ModelError, match="cannot read checkpoint") as error:
        load_checkpoint(corrupt)
    assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_atomic_json_and_jsonl_helpers(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "summary.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]}, mode=0o600)
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert target.stat().st_mode & 0o777 == 0o600
    log = tmp_path / "metrics.jsonl"
    assert read_jsonl(log) == []
    append_jsonl(log, {"round": 1})
    append_jsonl(log, {"round": 2})
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('{"round": 3, "trunc')  # a crash in the middle of a line
    assert read_jsonl(log) == [{"round": 1}, {"round": 2}]
    with open(log, "ab") as handle:  # garbage: was a RecursionError / UnicodeDecodeError
        handle.write(b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n\xff\xfe\n")
    assert read_jsonl(log) == [{"round": 1}, {"round": 2}]
    assert _no_temp_files(tmp_path)
