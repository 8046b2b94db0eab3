"""One site's side of a round: load local data, train or evaluate, report metrics.

Plain functions and a small class with no Flower imports, so that both the
plain and the secure (SecAgg+) ClientApp paths use exactly this code, and tests
can call it directly.
"""

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.shared import records
from fedge.shared.config import RunConfig
from fedge.shared.ml.data import RawData, load_data, task_for_run
from fedge.shared.ml.device import select_device
from fedge.shared.ml.models import build_run_model, exchanged_keys
from fedge.shared.ml.training import Metrics, evaluate, make_loader, train
from fedge.shared.preprocess import prepare

log = logging.getLogger(__name__)
LOCAL_EVAL_FRACTION = 0.15


@dataclass(frozen=True)
class SiteData:
    """A site's preprocessed data, split into local train and local evaluation parts."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def split_local(raw: RawData, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays for local training and local evaluation (fixed per seed)."""
    order = np.random.default_rng(seed).permutation(len(raw))
    n_eval = max(1, int(len(raw) * LOCAL_EVAL_FRACTION)) if len(raw) > 1 else 0
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def load_site_data(cfg: RunConfig, data_spec: str, label_column: str) -> SiteData:
    """Load and preprocess this site's data for the run's task."""
    task = task_for_run(cfg)
    raw = load_data(data_spec, task, label_column=label_column)
    x = prepare(raw.x, task.preprocessing)
    train_idx, eval_idx = split_local(raw, cfg.seed)
    return SiteData(x[train_idx], raw.y[train_idx], x[eval_idx], raw.y[eval_idx])


# One site's prepared data, kept for the life of the process (one entry: one site, one run at a
# time). The warm executor fills it in its parent process so that every forked ClientApp starts
# with it (``fedge.client.warm_executor``); partitioning and resizing cost more than a tiny
# model's local epoch.
_DATA_CACHE: dict[tuple[Any, ...], tuple[tuple[Any, ...], SiteData]] = {}
# Called after a cache miss with (run config, data spec, label column); see ``on_data_loaded``.
_loaded_hook: Callable[[RunConfig, str, str], None] | None = None


def on_data_loaded(hook: Callable[[RunConfig, str, str], None] | None) -> None:
    """Have ``hook`` called whenever this process loads a site's data (a cache miss)."""
    global _loaded_hook
    _loaded_hook = hook


def _source_signature(data_spec: str) -> tuple[Any, ...]:
    """What changes when the data behind ``data_spec`` changes (files: names, sizes, mtimes)."""
    from fedge.shared.ml.data import DataSpec

    spec = DataSpec.parse(data_spec)
    if spec.is_builtin:
        return ()
    path = Path(spec.source).expanduser()
    if path.is_file():
        st = path.stat()
        return ((st.st_size, st.st_mtime_ns),)
    entries = []
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with_path = os.path.join(folder, name)
            try:
                st = os.stat(with_path)
            except OSError:
                continue
            entries.append((with_path, st.st_size, st.st_mtime_ns))
    return tuple(sorted(entries))


def site_data(cfg: RunConfig, data_spec: str, label_column: str) -> tuple[SiteData, bool]:
    """This site's data for ``cfg``, from the process's cache when the source is unchanged.

    Returns the data and whether it came from the cache.
    """
    key = (data_spec, label_column, repr(task_for_run(cfg)), cfg.seed)
    signature = _source_signature(data_spec)
    cached = _DATA_CACHE.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1], True
    data = load_site_data(cfg, data_spec, label_column)
    _DATA_CACHE.clear()
    _DATA_CACHE[key] = (signature, data)
    if _loaded_hook is not None:
        _loaded_hook(cfg, data_spec, label_column)
    return data, False


def ndarrays_nbytes(arrays: list[np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays))


def _simulation_data(cfg: RunConfig, node_config: dict[str, Any]) -> str:
    """Under Flower's simulation engine a node knows only its partition: use the built-in set."""
    if "partition-id" in node_config and "num-partitions" in node_config:
        return f"{cfg.task}#{node_config['partition-id']}/{node_config['num-partitions']}"
    from fedge.shared.errors import DataError

    raise DataError("this SuperNode has no data: start it with `fedge client start --data SPEC`")


class Site:
    """The model and data of one site for one message (Flower starts a process per message)."""

    def __init__(self, cfg: RunConfig, node_config: dict[str, Any]) -> None:
        self.cfg = cfg
        self.name = str(
            node_config.get(records.NODE_SITE)
            or f"partition-{node_config.get('partition-id', 0)}"  # Flower's simulation engine
        )
        data_spec = str(node_config.get(records.NODE_DATA, "")) or _simulation_data(
            cfg, node_config
        )
        label_column = str(node_config.get(records.NODE_LABEL_COLUMN, cfg.label_column))
        local_weights = str(node_config.get(records.NODE_INIT_WEIGHTS, ""))
        if local_weights:
            cfg = cfg.replace(init_weights=local_weights)
        self.device = select_device()
        self.model = build_run_model(cfg, task_for_run(cfg))
        self.keys = exchanged_keys(self.model, cfg.mode)
        started = time.time()
        self.data, cached = site_data(cfg, data_spec, label_column)
        log.info(
            "site %s: data %s in %.3fs",
            self.name,
            "cached" if cached else "loaded",
            time.time() - started,
        )
        # The site's policy and ledger (``fedge.client.policy.SiteGuard``); None in unit tests.
        self.guard: Any = None

    def _admit(self, server_round: int, sample_rate: float, steps: int) -> dict[str, Any]:
        """Record this round in the site's ledger before training, or refuse it."""
        if self.guard is None:
            return {}
        return dict(self.guard.admit(self.cfg, server_round, sample_rate, steps))

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        """Load the global values of the exchanged entries into the local model."""
        if len(parameters) != len(self.keys):
            raise ValueError(
                f"server sent {len(parameters)} arrays, this site's model exchanges "
                f"{len(self.keys)}: is the site on the same model and mode as the run?"
            )
        state = {
            k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.keys, parameters, strict=True)
        }
        self.model.load_state_dict(state, strict=False)

    def get_parameters(self) -> list[np.ndarray]:
        state = self.model.state_dict()
        return [state[k].detach().cpu().numpy() for k in self.keys]

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train on local data from the global parameters; return new parameters."""
        self.set_parameters(parameters)
        loader = make_loader(
            self.data.x_train,
            self.data.y_train,
            self.cfg.batch_size,
            shuffle=True,
            seed=self.cfg.seed + int(config.get(records.CFG_SERVER_ROUND, 0)),
        )
        mu = float(config.get(records.CFG_PROXIMAL_MU, 0.0))
        server_round = int(config.get(records.CFG_SERVER_ROUND, 1))
        privacy_metrics: dict[str, Any] = {}
        started = time.time()
        if self.cfg.privacy.dp == "record":
            result, privacy_metrics = self._train_private(loader, mu, server_round)
        else:
            privacy_metrics = self._admit(server_round, 1.0, 1)
            result = train(
                self.model,
                loader,
                self.cfg.local_epochs,
                self.cfg.lr,
                self.device,
                momentum=self.cfg.momentum,
                proximal_mu=mu,
                freeze_batchnorm_stats=self.cfg.freezes_batchnorm_stats(),
            )
        out = self.get_parameters()
        if self.cfg.privacy.dp == "site":
            # Fail closed: clip here whether or not the server's message asks for it.
            from fedge.client.site_dp import clip_site_update

            out = clip_site_update(out, parameters, self.cfg.privacy.clipping_norm)
        log.info(
            "site %s: trained round %d in %.3fs", self.name, server_round, time.time() - started
        )
        metrics: dict[str, Any] = {
            **privacy_metrics,
            records.METRIC_SITE: self.name,
            records.METRIC_LOSS: result.loss,
            records.METRIC_ACCURACY: result.accuracy,
            records.METRIC_BYTES_DOWN: ndarrays_nbytes(parameters),
            records.METRIC_BYTES_UP: ndarrays_nbytes(out),
            records.METRIC_DEVICE: self.device.type,
        }
        # Site-level DP: every site weighs 1 in the mean (also inside SecAgg+, which weights
        # by num_examples), the mechanism the server's noise z*C/m is calibrated for.
        weight = 1 if self.cfg.privacy.dp == "site" else len(self.data.y_train)
        return out, weight, metrics

    def _train_private(
        self, loader: Any, mu: float, server_round: int
    ) -> tuple[Metrics, dict[str, Any]]:
        """DP-SGD for one round; returns this site's epsilon now and after one more round."""
        from fedge.client.dp_sgd import check_budget, dp_round, make_private, site_epsilon

        privacy = self.cfg.privacy
        per_round = dp_round(loader, self.cfg.local_epochs)
        epsilon = site_epsilon(privacy, per_round, server_round)
        check_budget(privacy, epsilon, self.name)
        ledger_metrics = self._admit(server_round, per_round.sample_rate, per_round.steps)
        model, optimizer, private_loader = make_private(
            self.model, loader, self.cfg.lr, self.cfg.momentum, privacy
        )
        result = train(
            model,
            private_loader,
            self.cfg.local_epochs,
            self.cfg.lr,
            self.device,
            proximal_mu=mu,
            optimizer=optimizer,
            mixed_precision=False,
            freeze_batchnorm_stats=self.cfg.freezes_batchnorm_stats(),
        )
        return result, {
            **ledger_metrics,
            records.METRIC_DP_SAMPLE_RATE: per_round.sample_rate,
            records.METRIC_DP_STEPS: per_round.steps,
            records.METRIC_EPSILON: epsilon,
            records.METRIC_EPSILON_NEXT: site_epsilon(privacy, per_round, server_round + 1),
        }

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        """Evaluate the global parameters on the local evaluation split."""
        self.set_parameters(parameters)
        loader = make_loader(self.data.x_eval, self.data.y_eval, 256, shuffle=False)
        result = evaluate(self.model, loader, self.device)
        return (
            result.loss,
            result.num_examples,
            {
                records.METRIC_SITE: self.name,
                records.METRIC_ACCURACY: result.accuracy,
            },
        )
