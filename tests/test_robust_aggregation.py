"""Robust strategies: one site sending a scaled, sign-flipped update spoils FedAvg, not them."""

from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedge.server.strategies import build_strategy
from fedge.shared.config import ROBUST_STRATEGIES, RunConfig
from fedge.shared.errors import ConfigError
from fedge.shared.ml.data import load_data, task_for_run
from fedge.shared.ml.models import build_run_model, exchanged_keys
from fedge.shared.ml.training import evaluate, make_loader, train
from fedge.shared.preprocess import prepare

SITES = 7  # Bulyan needs 4f + 3 sites for f = 1


def _arrays(model: torch.nn.Module, keys: list[str]) -> list[np.ndarray]:
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().copy() for k in keys]


@pytest.fixture(scope="module")
def round_updates() -> dict[str, Any]:
    """Seven sites train the same global CNN on their own digits; the last one attacks."""
    cfg = RunConfig(min_clients=SITES)
    task = task_for_run(cfg)
    torch.manual_seed(0)
    model = build_run_model(cfg, task)
    keys = exchanged_keys(model, "full")
    start = _arrays(model, keys)
    data = load_data("digits:train", task)
    x = prepare(data.x, task.preprocessing)
    shards = np.array_split(np.random.default_rng(0).permutation(len(x)), SITES)
    results = []
    honest = []
    for i, shard in enumerate(shards):
        model.load_state_dict(dict(zip(keys, map(torch.from_numpy, start), strict=True)))
        train(
            model, make_loader(x[shard], data.y[shard], 16, True, i), 3, 0.05, torch.device("cpu")
        )
        arrays = _arrays(model, keys)
        if i < SITES - 1:
            honest.append(arrays)
        if i == SITES - 1:  # model replacement: a boosted, sign-flipped update
            arrays = [s - 20.0 * (a - s) for a, s in zip(arrays, start, strict=True)]
        results.append((arrays, len(shard)))
    test = load_data("digits:test", task)
    loader = make_loader(prepare(test.x, task.preprocessing), test.y, 256, False)
    accuracies = []
    for arrays in honest:  # what one honest site reaches alone: Krum keeps one such update
        model.load_state_dict(dict(zip(keys, map(torch.from_numpy, arrays), strict=True)))
        accuracies.append(evaluate(model, loader, torch.device("cpu")).accuracy)
    return {
        "model": model, "keys": keys, "start": start, "results": results, "test": loader,
        "worst_honest": min(accuracies),
    }  # fmt: skip


def aggregate_accuracy(strategy_name: str, updates: dict[str, Any]) -> float:
    """One round of ``aggregate_fit`` with the real strategy; test accuracy of the result."""
    cfg = RunConfig(strategy=strategy_name, min_clients=SITES)
    strategy = build_strategy(
        cfg, ndarrays_to_parameters(updates["start"]), lambda *_: None, lambda _: {},
        lambda _: {}, lambda _: {}, SITES,
    )  # fmt: skip
    replies = [
        (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(a), n, {}))
        for a, n in updates["results"]
    ]
    parameters, _ = strategy.aggregate_fit(1, replies, [])  # type: ignore[arg-type]
    assert parameters is not None
    model, keys = updates["model"], updates["keys"]
    arrays = parameters_to_ndarrays(parameters)
    model.load_state_dict(dict(zip(keys, map(torch.from_numpy, arrays), strict=True)))
    return evaluate(model, updates["test"], torch.device("cpu")).accuracy


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_strategy_keeps_accuracy_fedavg_does_not(
    name: str, round_updates: dict[str, Any]
) -> None:
    fedavg = aggregate_accuracy("fedavg", round_updates)
    robust = aggregate_accuracy(name, round_updates)
    print(f"{name}: {robust:.3f}, fedavg {fedavg:.3f}, worst honest site alone "
          f"{round_updates['worst_honest']:.3f}")  # fmt: skip
    assert robust >= round_updates["worst_honest"] - 0.05, (name, robust)
    assert fedavg <= robust - 0.3, (name, fedavg, robust)


def test_robust_strategies_refuse_secagg_and_site_dp() -> None:
    with pytest.raises(ConfigError, match="sees only the sum"):
        RunConfig.from_mapping({"strategy": "fedmedian", "privacy_secagg": True})
    with pytest.raises(ConfigError, match="site-level DP"):
        RunConfig.from_mapping({"strategy": "krum", "min_clients": 5, "privacy_dp": "site"})
    with pytest.raises(ConfigError, match="needs min-clients of at least 7"):
        RunConfig(strategy="bulyan", min_clients=5)
    assert RunConfig.from_mapping({"strategy": "fedmedian", "privacy_dp": "record"})
