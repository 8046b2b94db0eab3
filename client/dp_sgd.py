"""Record-level differential privacy on a site: DP-SGD with Opacus, and its epsilon.

Each round a site runs ``local_epochs`` of DP-SGD (per-example clipping to
``clipping_norm``, Gaussian noise ``noise_multiplier`` x norm, Poisson-sampled
batches). Opacus' RDP accountant turns that into epsilon at ``delta``.

The site accounts for as many rounds as the server's round number: with every
site taking part in every round (fraction-train 1) that is exact, otherwise it
is an upper bound. It needs no state across rounds, so it stays right when a
run is resumed.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedge.shared.config import PrivacyConfig
from fedge.shared.errors import RunError


@dataclass(frozen=True)
class DpRound:
    """What one round of DP-SGD on this site costs, in accountant terms."""

    sample_rate: float
    steps: int  # optimizer steps per round


def dp_round(loader: DataLoader[tuple[torch.Tensor, ...]], local_epochs: int) -> DpRound:
    """Opacus samples each example with rate 1/len(loader), for len(loader) steps an epoch."""
    batches = max(len(loader), 1)
    return DpRound(sample_rate=1.0 / batches, steps=batches * local_epochs)


def site_epsilon(privacy: PrivacyConfig, per_round: DpRound, rounds: int) -> float:
    """Epsilon after ``rounds`` rounds of DP-SGD, with Opacus' RDP accountant."""
    if rounds <= 0:
        return 0.0
    if privacy.noise_multiplier <= 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [
        (privacy.noise_multiplier, per_round.sample_rate, per_round.steps * rounds)
    ]
    return float(accountant.get_epsilon(privacy.delta))


def check_budget(privacy: PrivacyConfig, epsilon: float, site: str) -> None:
    """Refuse to train a round that would take this site past the epsilon budget."""
    if privacy.epsilon_budget > 0 and epsilon > privacy.epsilon_budget:
        raise RunError(
            f"site {site}: this round would take epsilon to {epsilon:.2f}, past the budget "
            f"of {privacy.epsilon_budget:g}; not training"
        )


def make_private(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    lr: float,
    momentum: float,
    privacy: PrivacyConfig,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[tuple[torch.Tensor, ...]]]:
    """Wrap model, optimizer and loader for DP-SGD (per-example clipping + noise)."""
    from opacus import PrivacyEngine

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.clipping_norm,
        poisson_sampling=True,
    )
    return private_model, private_optimizer, private_loader
