"""Local training and evaluation, FedProx's proximal term, device choice, and one site's round."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedge.client.site import Site, split_local
from fedge.shared import records
from fedge.shared.config import RunConfig
from fedge.shared.ml.data import RawData, load_data, task_for_run
from fedge.shared.ml.device import select_device
from fedge.shared.ml.models import build_model
from fedge.shared.ml.training import evaluate, make_loader, predict_logits, train
from fedge.shared.preprocess import prepare

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    task = task_for_run(RunConfig(task="digits", model="cnn"))
    train_raw = load_data("digits", task)
    test_raw = load_data("digits:test", task)
    return {
        "x_train": prepare(train_raw.x, task.preprocessing),
        "y_train": train_raw.y,
        "x_test": prepare(test_raw.x, task.preprocessing),
        "y_test": test_raw.y,
    }


def test_cnn_learns_digits(digits: dict[str, np.ndarray]) -> None:
    torch.manual_seed(0)
    model = build_model("cnn", task_for_run(RunConfig()))
    test_loader = make_loader(digits["x_test"], digits["y_test"], 256, shuffle=False)
    before = evaluate(model, test_loader, CPU)
    loader = make_loader(digits["x_train"], digits["y_train"], 32, shuffle=True, seed=0)
    first = train(model, loader, 1, 0.05, CPU)
    last = train(model, loader, 2, 0.05, CPU)
    after = evaluate(model, test_loader, CPU)
    assert first.num_examples == last.num_examples == len(digits["y_train"])
    assert last.loss < first.loss
    assert after.loss < before.loss
    assert before.accuracy < 0.3  # an untrained model guesses
    assert after.accuracy > 0.8
    assert after.num_examples == len(digits["y_test"])
    logits = predict_logits(model, digits["x_test"])
    assert logits.shape == (len(digits["y_test"]), 10) and logits.dtype == np.float32
    assert np.mean(logits.argmax(1) == digits["y_test"]) == pytest.approx(after.accuracy)


def test_evaluate_on_a_fixed_model() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = inputs
    x = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]], dtype=np.float32)
    y = np.array([0, 1, 1])
    # Batches of 2 and 1: the loss must be the mean over examples, not over batches.
    result = evaluate(model, make_loader(x, y, 2, shuffle=False), CPU)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-3)) + math.log1p(math.e)) / 3
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.num_examples == 3
    empty = evaluate(model, make_loader(x[:0], y[:0], 2, shuffle=False), CPU)
    assert (empty.loss, empty.accuracy, empty.num_examples) == (0.0, 0.0, 0)


def test_make_loader_shuffles_reproducibly() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10)

    def order(seed: int) -> list[int]:
        return [int(v) for _, ys in make_loader(x, y, 4, shuffle=True, seed=seed) for v in ys]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(10))
    plain = [int(v) for _, ys in make_loader(x, y, 4, shuffle=False) for v in ys]
    assert plain == list(range(10))


def test_a_batchnorm_model_trains_on_a_site_with_one_example_past_a_full_batch() -> None:
    # 9 examples in batches of 8 left a batch of one, which BatchNorm cannot train on.
    x = np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32)
    y = np.arange(9) % 2
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    loader = make_loader(x, y, 8, shuffle=True)
    assert [len(ys) for _, ys in loader] == [8]
    train(model, loader, 1, lr=0.01, device=CPU)
    assert [len(ys) for _, ys in make_loader(x, y, 8, shuffle=False)] == [8, 1]
    assert [len(ys) for _, ys in make_loader(x[:2], y[:2], 8, shuffle=True)] == [2]


def test_fedprox_keeps_weights_closer_to_the_start(digits: dict[str, np.ndarray]) -> None:
    def drift(mu: float) -> float:
        torch.manual_seed(1)
        model = build_model("cnn", task_for_run(RunConfig()))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        loader = make_loader(digits["x_train"][:256], digits["y_train"][:256], 32, True, seed=0)
        train(model, loader, 2, 0.05, CPU, proximal_mu=mu)
        return sum(float((v - start[k]).pow(2).sum()) for k, v in model.state_dict().items())

    free, prox = drift(0.0), drift(1.0)
    assert prox < 0.5 * free


def test_fedprox_under_dp_sgd_pulls_towards_the_start() -> None:
    from fedge.client.dp_sgd import make_private
    from fedge.shared.config import PrivacyConfig

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 64)

    def drift(mu: float) -> float:
        torch.manual_seed(0)
        model = build_model("cnn", task_for_run(RunConfig()))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        loader = make_loader(x, y, 16, shuffle=True, seed=0)
        privacy = PrivacyConfig(dp="record", noise_multiplier=1.0)
        private, optimizer, private_loader = make_private(model, loader, 0.05, 0.9, privacy)
        train(private, private_loader, 1, 0.05, CPU, proximal_mu=mu, optimizer=optimizer)
        return sum(float((v - start[k]).pow(2).sum()) for k, v in model.state_dict().items())

    # mu 10 at lr 0.05 is stable; with the term applied after the noise, drift drops ~6x.
    assert drift(10.0) < 0.5 * drift(0.0)


def test_select_device_honours_fedge_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FEDGE_DEVICE", raising=False)
    assert select_device().type == "cuda"
    monkeypatch.setenv("FEDGE_DEVICE", "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FEDGE_DEVICE")
    assert select_device().type == "cpu"


# --- one site's round (client/site.py), without Flower -------------------------------------


def test_split_local_is_disjoint_and_fixed() -> None:
    raw = RawData(np.zeros((40, 2)), np.zeros(40, dtype=np.int64), ("a",))
    train_idx, eval_idx = split_local(raw, seed=3)
    assert len(eval_idx) == 6 and len(train_idx) == 34
    assert set(train_idx.tolist()) | set(eval_idx.tolist()) == set(range(40))
    assert not set(train_idx.tolist()) & set(eval_idx.tolist())
    again = split_local(raw, seed=3)
    np.testing.assert_array_equal(again[1], eval_idx)


def test_site_fit_and_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDGE_DEVICE", "cpu")
    cfg = RunConfig(model="cnn", mode="head", local_epochs=1, batch_size=32)
    node = {records.NODE_SITE: "clinic-a", records.NODE_DATA: "digits:public"}
    site = Site(cfg, node)
    # get_parameters returns views of the live model's tensors: copy to compare later.
    start = [a.copy() for a in site.get_parameters()]
    assert [a.shape for a in start] == [(10, 64), (10,)]  # head mode: the head travels
    out, n, metrics = site.fit(start, {records.CFG_SERVER_ROUND: 1})
    assert n == len(site.data.y_train) > 0
    assert len(out) == 2 and not np.array_equal(out[0], start[0])
    assert metrics[records.METRIC_SITE] == "clinic-a"
    assert metrics[records.METRIC_BYTES_DOWN] == metrics[records.METRIC_BYTES_UP] == 10 * 65 * 4
    assert metrics[records.METRIC_DEVICE] == "cpu"
    assert 0.0 <= metrics[records.METRIC_ACCURACY] <= 1.0
    loss, n_eval, eval_metrics = site.evaluate(out, {})
    assert n_eval == len(site.data.y_eval) > 0
    assert loss > 0 and eval_metrics[records.METRIC_SITE] == "clinic-a"
    with pytest.raises(ValueError, match="server sent 3 arrays"):
        site.set_parameters([*start, start[0]])


def test_head_mode_keeps_the_frozen_backbone_batchnorm_statistics() -> None:
    """Head mode freezes the whole backbone, its BatchNorm running statistics included."""
    from fedge.shared.ml.models import build_model, freeze_for_mode
    from fedge.shared.tasks import image_task

    task = image_task("digits", tuple(str(c) for c in range(10)), 32, 1, "resnet18")
    model = build_model("resnet18", task)
    freeze_for_mode(model, "resnet18", "head")
    before = model.bn1.running_mean.clone()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3, 32, 32)).astype(np.float32)
    train(model, make_loader(x, rng.integers(0, 10, 16), 8, True), 1, 0.05, CPU)
    assert torch.equal(model.bn1.running_mean, before)


def test_frozen_batchnorm_stats_keep_running_statistics_while_everything_trains() -> None:
    """``freeze_batchnorm_stats``: BatchNorm normalises with its initial statistics, and its
    affine weights and every other layer still train (full-mode fine-tuning)."""
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.normal(size=(32, 4))).astype(np.float32)  # far from mean 0, var 1
    y = rng.integers(0, 2, 32)

    def trained(freeze: bool) -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        train(model, make_loader(x, y, 8, True), 1, 0.05, CPU, freeze_batchnorm_stats=freeze)
        return model

    start = nn.BatchNorm1d(3).state_dict()
    frozen, moving = trained(True), trained(False)
    bn = frozen[1]
    assert torch.equal(bn.running_mean, start["running_mean"])
    assert torch.equal(bn.running_var, start["running_var"])
    assert int(bn.num_batches_tracked) == 0
    assert not torch.equal(bn.weight.detach(), start["weight"])  # affine weights learn
    assert not torch.equal(moving[1].running_mean, start["running_mean"])  # the default moves


def test_batchnorm_stats_config_resolves_per_mode_and_init_weights() -> None:
    from fedge.shared.errors import ConfigError

    assert not RunConfig(batchnorm_stats="train").freezes_batchnorm_stats()  # PyTorch's way
    auto = RunConfig(init_weights="w.safetensors")  # the default: "auto"
    assert auto.batchnorm_stats == "auto" and auto.freezes_batchnorm_stats()
    assert not auto.replace(init_weights="").freezes_batchnorm_stats()  # from scratch
    assert not auto.replace(mode="lora").freezes_batchnorm_stats()  # backbone frozen anyway
    assert RunConfig(batchnorm_stats="frozen").freezes_batchnorm_stats()
    assert RunConfig.from_flower({"batchnorm-stats": "frozen"}).freezes_batchnorm_stats()
    with pytest.raises(ConfigError, match="unknown batchnorm-stats 'eval'"):
        RunConfig(batchnorm_stats="eval")
