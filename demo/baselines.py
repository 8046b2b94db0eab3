"""What federation is measured against: each site alone, and all sites' data pooled.

Both baselines start from the run's initial model (its ``init-weights``), train with the
run's recipe (mode, learning rate, momentum, batch size) for the same epoch budget as
the federation (``num_rounds * local_epochs`` epochs over the data), and are scored on
the held-out test split the server evaluates the federated model on.

- **local-only**: one model per site, trained on that site's own training split (the
  exact examples its SuperNode trains on in the federation);
- **centralised**: one model on the union of those splits, the upper bound a
  federation approaches (possible only where the data could be pooled: a demo or a
  benchmark).

Both train without DP: data that never leaves its site needs none, so the baselines
are what a site could do without the federation's privacy cost, which makes
"federated beats the best site alone" a harder bar, not an easier one.
Plain in-process torch; no Flower.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedge.shared.config import PrivacyConfig, RunConfig

__all__ = ["Baselines", "centralized_vs_local", "epoch_budget", "render_baselines"]


@dataclass(frozen=True)
class Baselines:
    """Held-out accuracy of each site trained alone, and of one model on the pooled data."""

    local_only: dict[str, float]
    centralized: float
    epochs: int

    @property
    def best_local(self) -> float:
        """NaN when the local-only baselines were not trained."""
        return max(self.local_only.values(), default=float("nan"))

    @property
    def mean_local(self) -> float:
        """NaN when the local-only baselines were not trained."""
        values = list(self.local_only.values())
        return float(np.mean(values)) if values else float("nan")


def epoch_budget(cfg: RunConfig) -> int:
    """Epochs over its data a site spends in the federation (every site in every round)."""
    return cfg.num_rounds * cfg.local_epochs


def centralized_vs_local(
    cfg: RunConfig,
    sites: Mapping[str, str],
    epochs: int | None = None,
    test_data: str = "",
    threads: int | None = None,
    local: bool = True,
) -> Baselines:
    """Train the local-only and centralised baselines of the run ``cfg``.

    Parameters
    ----------
    cfg
        The federated run's config: task, model, ``init-weights``, mode and recipe.
    sites
        Site name -> the data spec its SuperNode holds (e.g. ``digits#0/3``).
    epochs
        Epoch budget; default ``epoch_budget(cfg)``.
    test_data
        Data spec scored on; default the run's ``eval-data``, else the task's test split.
    threads
        torch threads while training (restored after); default: torch's setting. One is
        faster for a tiny model on a loaded machine: measured with the demo's CNN, two
        threads took 60 s of wall and 16 s of CPU time where one took 7 s and 1.2 s
        (OpenMP workers spinning against other processes).
    local
        Also train the local-only baselines (as many models as sites); False leaves
        ``local_only`` empty (a benchmark that needs only the centralised bound).

    Returns
    -------
    Baselines
        Accuracy of each site alone and of the pooled model on the test data.
    """
    import torch

    from fedge.client.site import load_site_data
    from fedge.shared.ml.data import load_data, task_for_run
    from fedge.shared.ml.device import select_device
    from fedge.shared.ml.training import evaluate, make_loader, train
    from fedge.shared.preprocess import prepare

    plain = dataclasses.replace(cfg, privacy=PrivacyConfig())
    budget = epoch_budget(cfg) if epochs is None else epochs
    task = task_for_run(plain)
    device = select_device()
    test = load_data(test_data or cfg.eval_data or f"{cfg.task}:test", task)
    test_loader = make_loader(prepare(test.x, task.preprocessing), test.y, 256, shuffle=False)
    # The same split into local train and local evaluation as the site's SuperNode makes.
    data = {name: load_site_data(plain, spec, plain.label_column) for name, spec in sites.items()}

    def trained(x: np.ndarray, y: np.ndarray) -> float:
        from fedge.shared.ml.models import build_run_model

        torch.manual_seed(plain.seed)  # every baseline starts from the same head and draws
        model = build_run_model(plain, task)
        if budget > 0:
            loader = make_loader(x, y, plain.batch_size, shuffle=True, seed=plain.seed)
            train(
                model,
                loader,
                budget,
                plain.lr,
                device,
                momentum=plain.momentum,
                freeze_batchnorm_stats=plain.freezes_batchnorm_stats(),
            )
        return evaluate(model, test_loader, device).accuracy

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        alone = {name: trained(d.x_train, d.y_train) for name, d in data.items()} if local else {}
        pooled_x = np.concatenate([d.x_train for d in data.values()])
        pooled_y = np.concatenate([d.y_train for d in data.values()])
        return Baselines(alone, trained(pooled_x, pooled_y), budget)
    finally:
        torch.set_num_threads(before)


def render_baselines(
    baselines: Baselines,
    federated: float | None,
    pretrained: float | None = None,
    private: bool = False,
) -> Sequence[str]:
    """Lines that put federated accuracy beside the baselines, and say who won (and why not).

    ``private``: the federated model trained under DP-SGD, which the baselines do not.
    """
    lines = []
    if pretrained is not None:
        lines.append(f"  pretrained (public data only)        {100 * pretrained:5.1f}%")
    for name, accuracy in baselines.local_only.items():
        lines.append(f"  {name + ' alone':<37}{100 * accuracy:5.1f}%")
    if federated is not None:
        lines.append(f"  federated                            {100 * federated:5.1f}%")
    lines.append(f"  centralised (pooled, upper bound)    {100 * baselines.centralized:5.1f}%")
    if federated is not None:
        gain = federated - baselines.best_local
        verdict = (
            f"federation beats the best site alone by {100 * gain:.1f} points"
            if gain > 0
            else f"federation does NOT beat the best site alone ({100 * gain:+.1f} points"
            + ("; its DP-SGD noise costs accuracy the baselines do not pay)" if private else ")")
        )
        gap = federated / baselines.centralized if baselines.centralized > 0 else float("nan")
        lines.append(f"  {verdict}; federated / centralised = {gap:.3f}")
    lines.append(
        f"  (baselines: same recipe, {baselines.epochs} epochs, no DP, same held-out test data)"
    )
    return lines
