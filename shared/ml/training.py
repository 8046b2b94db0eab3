"""Local training and evaluation: plain functions, no Flower.

The ClientApp, the server-side evaluation and the demo's central pretraining
all call these, so a secure run and a plain run train identically.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedge.shared.ml.device import autocast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metrics:
    """Loss and accuracy over ``num_examples`` examples."""

    loss: float
    accuracy: float
    num_examples: int


def make_loader(
    x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, ...]]:
    """A DataLoader over preprocessed float32 inputs and int64 labels.

    A training loader (``shuffle``) drops a last batch of one example: BatchNorm cannot
    train on it (torchvision's mobilenet_v3_small raised on a site holding 8k + 1 examples).
    """
    dataset = TensorDataset(torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(y))
    generator = torch.Generator().manual_seed(seed)
    lone_last = shuffle and len(dataset) > 1 and len(dataset) % batch_size == 1
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=lone_last,
    )


def _add_proximal_gradient(anchors: Sequence[tuple[torch.Tensor, torch.Tensor]], mu: float) -> None:
    """FedProx: the gradient of mu/2 ||w - w_global||^2, added to each trainable weight."""
    for param, anchor in anchors:
        if param.grad is not None:
            param.grad.add_(param.detach() - anchor, alpha=mu)


def _step(
    optimizer: torch.optim.Optimizer,
    anchors: Sequence[tuple[torch.Tensor, torch.Tensor]],
    mu: float,
) -> None:
    """One optimizer step with FedProx's term added after DP-SGD's clipping and noise.

    Opacus rebuilds ``grad`` from the clipped, noised per-example gradients, so a
    term in the loss would be lost; the proximal term does not depend on data, so
    adding it after ``pre_step`` costs no privacy.
    """
    pre_step = getattr(optimizer, "pre_step", None)
    if pre_step is None:
        _add_proximal_gradient(anchors, mu)
        optimizer.step()
    elif pre_step():
        _add_proximal_gradient(anchors, mu)
        optimizer.original_optimizer.step()  # type: ignore[attr-defined]


def _keep_batchnorm_stats_fixed(model: nn.Module, all_layers: bool) -> None:
    """BatchNorm layers that keep their running statistics: eval mode.

    A frozen backbone keeps its statistics too (head, LoRA mode). ``all_layers`` also fixes
    those of BatchNorm layers that train: they then normalise with the initial weights'
    statistics, and only their affine weights (and everything else) learn. Fine-tuning a
    pretrained model on small, label-skewed sites needs this: each site's batch statistics
    describe its few classes, and the average of ten such estimates is no network's.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            all_layers or not any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            module.eval()


def train(
    model: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, ...]],
    epochs: int,
    lr: float,
    device: torch.device,
    momentum: float = 0.9,
    proximal_mu: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    on_batch: Callable[[], None] | None = None,
    mixed_precision: bool = True,
    freeze_batchnorm_stats: bool = False,
) -> Metrics:
    """Train ``model`` in place with SGD; returns the metrics of the last epoch.

    ``proximal_mu`` > 0 adds FedProx's proximal term towards the weights the
    model had on entry (to the gradient; the reported loss is the data loss). An
    ``optimizer`` may be passed in (DP-SGD wraps its own). ``freeze_batchnorm_stats``
    keeps every BatchNorm layer's running statistics (``RunConfig.freezes_batchnorm_stats``).
    """
    model.to(device).train()
    _keep_batchnorm_stats_fixed(model, freeze_batchnorm_stats)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    anchors = [(p, p.detach().clone()) for p in params] if proximal_mu > 0 else []
    criterion = nn.CrossEntropyLoss()
    loss_sum = correct = seen = 0.0
    for _ in range(epochs):
        loss_sum = correct = seen = 0.0
        for x, y in loader:
            if len(y) == 0:  # Poisson sampling under DP-SGD can draw an empty batch
                continue
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device if mixed_precision else torch.device("cpu")):
                logits = model(x)
                loss = criterion(logits.float(), y)
            loss.backward()
            _step(optimizer, anchors, proximal_mu)
            loss_sum += float(loss.detach()) * len(y)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(y)
            if on_batch is not None:
                on_batch()
    seen = max(seen, 1)
    return Metrics(loss_sum / seen, correct / seen, int(seen))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]], device: torch.device
) -> Metrics:
    """Cross-entropy loss and top-1 accuracy of ``model`` over ``loader``."""
    model.to(device).eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = correct = seen = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x).float()
        loss_sum += float(criterion(logits, y))
        correct += float((logits.argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        return Metrics(0.0, 0.0, 0)
    return Metrics(loss_sum / seen, correct / seen, int(seen))


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Float32 logits of ``model`` on preprocessed inputs, on the CPU (for validation)."""
    model.cpu().eval()
    out = [
        model(torch.from_numpy(np.asarray(x[i : i + batch_size], np.float32))).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
