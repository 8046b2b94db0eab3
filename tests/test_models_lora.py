"""LoRA mode: only adapters and head travel, DP-SGD runs on them, export merges them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedge.client.site import Site
from fedge.edge.export.onnx_export import export_onnx
from fedge.shared import records
from fedge.shared.config import RunConfig
from fedge.shared.errors import ModelError
from fedge.shared.ml.checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import SmallCNN, build_run_model, exchanged_keys

pytest.importorskip("peft", reason="mode 'lora' needs peft (pip install 'fedge[train]')")
NODE = {records.NODE_SITE: "a", records.NODE_DATA: "digits#0/2"}


def fit_once(cfg: RunConfig) -> tuple[Site, list[np.ndarray], dict[str, object]]:
    torch.manual_seed(0)
    site = Site(cfg, NODE)
    start = [a.copy() for a in site.get_parameters()]
    out, _, metrics = site.fit(start, {records.CFG_SERVER_ROUND: 1})
    assert any(not np.array_equal(a, b) for a, b in zip(out, start, strict=True))
    return site, out, metrics


def test_lora_sends_adapters_and_head_only_in_the_trainable_ratio() -> None:
    lora_site, _, lora_metrics = fit_once(RunConfig(mode="lora", lora_rank=2))
    full_site, _, full_metrics = fit_once(RunConfig(mode="full"))
    model = lora_site.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in full_site.model.parameters())
    assert all("lora_" in k or "modules_to_save" in k for k in lora_site.keys)
    assert any("modules_to_save" in k for k in lora_site.keys)  # the new head travels
    assert lora_metrics[records.METRIC_BYTES_UP] == 4 * trainable
    ratio = lora_metrics[records.METRIC_BYTES_UP] / full_metrics[records.METRIC_BYTES_UP]
    assert ratio == pytest.approx(trainable / total) and ratio < 1


def test_lora_runs_under_dp_sgd() -> None:
    site, _, metrics = fit_once(RunConfig.from_mapping({"mode": "lora", "privacy_dp": "record"}))
    assert float(str(metrics[records.METRIC_EPSILON])) > 0
    assert all("lora_" in k or "modules_to_save" in k for k in site.keys)


def test_configured_targets_and_a_bad_target() -> None:
    cfg = RunConfig(mode="lora", lora_targets="features.0")
    model = build_run_model(cfg, task_for_run(cfg))
    adapted = {k.split(".lora_")[0] for k in exchanged_keys(model, "lora") if ".lora_" in k}
    assert adapted == {"base_model.model.features.0"}
    with pytest.raises(ModelError, match="cannot add LoRA adapters"):
        bad = RunConfig(mode="lora", lora_targets="no_such_layer")
        build_run_model(bad, task_for_run(bad))


def test_merged_export_matches_the_peft_model(tmp_path: Path) -> None:
    cfg = RunConfig(mode="lora", lora_rank=4)
    site, _, _ = fit_once(cfg)
    peft_model = site.model.eval()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, peft_model.state_dict(), 1, cfg.model, task_for_run(cfg),
                    cfg.to_flower())  # fmt: skip
    plain = load_model_from_checkpoint(load_checkpoint(path))
    assert type(plain) is SmallCNN  # adapters merged: the base model's own layers and ops
    assert not any("lora" in n for n, _ in plain.named_modules())
    x = site.data.x_eval[:64]
    with torch.no_grad():
        expected = peft_model(torch.from_numpy(x)).numpy()
    # The adapters moved the model: a merge that dropped them would differ.
    base = site.model.get_base_model()
    with torch.no_grad(), site.model.disable_adapter():
        assert not np.allclose(base(torch.from_numpy(x)).numpy(), expected, atol=1e-4)
    export_onnx(plain, torch.from_numpy(x[:1]), tmp_path / "model.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert float(np.max(np.abs(got - expected))) < 1e-4
    assert isinstance(plain, nn.Module)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_default_lora_sends_at_most_5_percent_of_full_mode(name: str) -> None:
    def exchanged_bytes(cfg: RunConfig) -> int:
        model = build_run_model(cfg, task_for_run(cfg), load_weights=False)
        state = model.state_dict()
        return sum(
            state[k].numel() * state[k].element_size() for k in exchanged_keys(model, cfg.mode)
        )

    lora = exchanged_bytes(RunConfig(model=name, mode="lora"))
    full = exchanged_bytes(RunConfig(model=name, mode="full"))
    # The target, with the default rank (measured: resnet18 1.33 %, mobilenet 4.31 %).
    assert lora <= 0.05 * full
