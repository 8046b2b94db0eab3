"""The demo's baselines: each site alone and the pooled data, trained for real and scored."""

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedge.demo.baselines import centralized_vs_local, epoch_budget, render_baselines
from fedge.demo.pipeline import (
    PRETRAIN_EXAMPLES,
    DemoOptions,
    _baselines,
    demo_config,
    demo_site_specs,
    pretrain,
)
from fedge.shared.config import RunConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Strong label skew: each site holds mostly two or three digits.
SKEWED = {f"site-{i + 1}": f"digits#{i}/3?alpha=0.1" for i in range(3)}


def test_pooled_data_beats_every_site_alone_on_skewed_sites() -> None:
    cfg = RunConfig(task="digits", model="cnn", num_rounds=3, lr=0.02)

    result = centralized_vs_local(cfg, SKEWED)

    assert result.epochs == epoch_budget(cfg) == 3
    assert set(result.local_only) == set(SKEWED)
    # A site that saw two or three digits cannot classify ten; measured: 0.39 / 0.25 / 0.28
    # alone, 0.85 pooled (seed 0), and 0.38 / 0.11 / 0.21 vs 0.89 (seed 1).
    assert result.centralized > 0.7
    assert result.best_local < result.centralized - 0.2
    # Different data gives different models: the sites are not scored on one shared model.
    assert len({round(a, 6) for a in result.local_only.values()}) == 3


def test_without_training_every_baseline_is_the_initial_model() -> None:
    cfg = RunConfig(task="digits", model="cnn", num_rounds=3, lr=0.02)

    untrained = centralized_vs_local(cfg, SKEWED, epochs=0)
    trained = centralized_vs_local(cfg, SKEWED, epochs=1)

    # One initial model scored on one test set: all equal, and training moves every number.
    scores = {*untrained.local_only.values(), untrained.centralized}
    assert len(scores) == 1
    assert (
        all(trained.local_only[name] != untrained.local_only[name] for name in SKEWED)
        and trained.centralized != untrained.centralized
    )


def test_render_says_whether_federation_beat_the_best_site() -> None:
    cfg = RunConfig(task="digits", model="cnn", num_rounds=1)
    result = centralized_vs_local(cfg, SKEWED, epochs=1)

    won = "\n".join(render_baselines(result, result.best_local + 0.05, 0.5))
    lost = "\n".join(render_baselines(result, result.best_local - 0.05, 0.5, private=True))

    assert "beats the best site alone by 5.0 points" in won
    assert "does NOT beat the best site alone (-5.0 points" in lost and "DP-SGD" in lost


def test_demo_records_the_baselines_for_its_sites(tmp_path: Path) -> None:
    options = DemoOptions(tmp_path, clients=2, rounds=1, privacy=False)
    cfg = RunConfig(task="digits", model="cnn", num_rounds=1, lr=0.02)
    console = Console(record=True, width=120)

    fields = _baselines(cfg, options, {"final_accuracy": 0.5, "pretrained_accuracy": 0.1}, console)

    assert demo_site_specs(2) == ["digits#0/2?alpha=0.1", "digits#1/2?alpha=0.1"]
    assert set(fields["local_only_accuracy"]) == {"site-1", "site-2"}
    assert 0 < fields["centralized_accuracy"] <= 1 and fields["baseline_epochs"] == 1
    json.dumps(fields)  # it goes into summary.json as it is
    text = console.export_text()
    assert "site-1 alone" in text and "centralised (pooled, upper bound)" in text


def test_the_demo_leaves_room_that_no_site_alone_can_fill(tmp_path: Path) -> None:
    """The demo's design: a weak public start, and sites too skewed to learn all ten digits."""
    from fedge.client.site import load_site_data

    quiet = Console(quiet=True)
    weak = pretrain(tmp_path / "weak.safetensors", quiet)
    full = pretrain(tmp_path / "full.safetensors", quiet, examples=None)
    options = DemoOptions(tmp_path, clients=3, rounds=3)
    cfg = demo_config(options, tmp_path / "weak.safetensors")
    sites = {f"site-{i + 1}": spec for i, spec in enumerate(demo_site_specs(3))}

    result = centralized_vs_local(cfg, sites)

    # Measured (seed 0): 0.79 from 200 public images, 0.92 from all 269; sites alone
    # 0.57 / 0.56 / 0.68, pooled 0.93.
    assert PRETRAIN_EXAMPLES < 269 and weak < full - 0.05
    assert result.centralized > weak + 0.08  # room for the federation to learn
    assert result.best_local < result.centralized - 0.15  # which no site alone fills
    for spec in sites.values():
        # Each site holds mostly a few digits: its five most common ones are >= 90 % of it.
        counts = sorted(np.bincount(load_site_data(cfg, spec, "label").y_train, minlength=10))
        assert sum(counts[-5:]) >= 0.9 * sum(counts), (spec, counts)


def test_demo_options_the_demo_cannot_run_are_refused_before_pretraining(tmp_path):
    """``--clients 2`` with privacy used to die after pretraining, at SecAgg+'s share check."""
    from rich.console import Console

    from fedge.demo.pipeline import DemoOptions, check_options, run_demo
    from fedge.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="SecAgg\\+ needs at least 3 sites") as caught:
        run_demo(DemoOptions(tmp_path / "out", clients=2, rounds=1), Console())
    assert "--no-privacy" in caught.value.hint
    assert not (tmp_path / "out").exists()  # refused before anything ran
    check_options(DemoOptions(tmp_path, clients=2, rounds=1, privacy=False))  # plain path: fine
    for clients, rounds in [(1, 1), (3, 0)]:
        with pytest.raises(ConfigError):
            check_options(DemoOptions(tmp_path, clients=clients, rounds=rounds))
