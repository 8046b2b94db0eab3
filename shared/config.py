"""The run config: one frozen dataclass, loaded once at the entry point.

Precedence, in one loader: defaults < TOML file < ``FEDGE_*`` environment <
command-line flags. The same values travel to the ServerApp as Flower's run
config (flat, kebab-case keys); ``RunConfig.from_flower`` reads them back, so
the CLI and the ServerApp can never disagree about a default.

Site paths and keys are *not* here: they are the node config of each SuperNode
and stay on the site.
"""

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedge.shared.errors import ConfigError
from fedge.shared.model_names import check_model_name
from fedge.shared.tasks import BUILTIN_TASKS, USER_TASKS

MODES = ("full", "head", "lora")
# BatchNorm running statistics during local training: "train" updates them from each batch
# (PyTorch's default); "frozen" keeps the initial weights' values (BatchNorm layers in eval
# mode, their affine weights still train); "auto" freezes them in full mode when the run
# starts from init-weights (fine-tuning a pretrained model), else trains them.
BATCHNORM_STATS = ("auto", "train", "frozen")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedavgm")
# Flower's Byzantine-robust aggregators: they need each site's update, not only the sum.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
DP_LEVELS = ("none", "record", "site")
# What a submitted run does: fine-tune a model, or the export's federated job on artifacts
# (evaluate candidate artifacts, or sum calibration histograms; ``fedge.server.artifact_job``).
JOBS = ("train", "artifacts")
# Upper bounds of the integer settings: a run config also comes from the coordinator, and a
# site sizes buffers and loops by these, so an absurd value must be refused, not allocated
# (Flower's run config carries a 64-bit integer at most anyway).
INT_LIMITS = {
    "num_rounds": 100_000,
    "local_epochs": 10_000,
    "batch_size": 65_536,
    "min_clients": 100_000,
    "image_size": 4096,
    "lora_rank": 4096,
    "lora_alpha": 1_000_000,
    "byzantine_sites": 100_000,
    "seed": 2**32 - 1,
}


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy and secure aggregation settings of a run."""

    dp: str = "none"  # none | record (DP-SGD on each site) | site (clip on site, noise on server)
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 0.0  # 0: no budget
    secagg: bool = False
    secagg_num_shares: int = 3
    secagg_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    # Seconds SecAgg+ waits for each stage's replies; a site slower than this counts as
    # dropped. Must cover a site's local training time.
    secagg_timeout: float = 600.0
    # Federated artifact jobs: Gaussian noise on the summed counts, as a multiple of their
    # per-record L2 sensitivity (0: exact sums; see ``fedge.server.artifact_job``).
    count_noise_multiplier: float = 0.0


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federated fine-tuning run."""

    task: str = "digits"
    model: str = "cnn"
    init_weights: str = ""
    mode: str = "full"
    # LoRA (mode "lora"): adapter rank, scale alpha, dropout, and the module names to adapt
    # (comma-separated; empty: every Linear and Conv2d of the backbone). Rank 4 keeps the
    # bytes per round under 5 % of full mode on mobilenet_v3_small (4.3 %; rank 8: 7.9 %).
    lora_rank: int = 4
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_targets: str = ""
    # One of BATCHNORM_STATS. "auto" (frozen when fine-tuning pretrained weights in full mode):
    # on mobilenet_v3_small, 10 label-skewed sites, it kept FedAvg from collapsing (docs/models.md).
    batchnorm_stats: str = "auto"
    strategy: str = "fedavg"
    num_rounds: int = 3
    local_epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    min_clients: int = 2
    fraction_train: float = 1.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01  # FedAdam's eta
    # FedAvgM: server momentum and the server's own learning rate (1.0: the averaged step).
    server_momentum: float = 0.9
    server_momentum_lr: float = 1.0
    # Robust strategies: how many sites may be Byzantine (Krum, MultiKrum, Bulyan), and the
    # fraction FedTrimmedAvg cuts from each end.
    byzantine_sites: int = 1
    trim_fraction: float = 0.2
    federated_eval: bool = True
    server_eval: bool = True
    eval_data: str = ""  # data spec for server-side evaluation; default: the task's test split
    image_size: int = 0  # 0: the model's default for the task
    classes: str = ""  # comma-separated, for user tasks ("images", "tabular")
    features: str = ""  # comma-separated column order, for "tabular"
    label_column: str = "label"
    run_dir: str = "runs/latest"
    seed: int = 0
    resume: bool = False  # continue the run in run_dir from its last checkpoint
    job: str = "train"  # one of JOBS
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        errors: list[str] = []
        if self.task not in BUILTIN_TASKS + USER_TASKS:
            known = ", ".join(BUILTIN_TASKS + USER_TASKS)
            errors.append(f"unknown task {self.task!r}; choose one of: {known}")
        try:
            check_model_name(self.model)
        except ConfigError as e:
            errors.append(str(e))
        if self.mode not in MODES:
            errors.append(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.batchnorm_stats not in BATCHNORM_STATS:
            errors.append(
                f"unknown batchnorm-stats {self.batchnorm_stats!r}; "
                f"choose one of: {', '.join(BATCHNORM_STATS)}"
            )
        if self.strategy not in STRATEGIES + ROBUST_STRATEGIES:
            known = ", ".join(STRATEGIES + ROBUST_STRATEGIES)
            errors.append(f"unknown strategy {self.strategy!r}; choose one of: {known}")
        errors.extend(self._robust_errors())
        errors.extend(self._server_optimizer_errors())
        if self.job not in JOBS:
            errors.append(f"unknown job {self.job!r}; choose one of: {', '.join(JOBS)}")
        if not 0 <= self.privacy.count_noise_multiplier <= 1e6:
            errors.append("privacy count-noise-multiplier must be in [0, 1e6]")
        if self.privacy.dp not in DP_LEVELS:
            errors.append(f"unknown dp level {self.privacy.dp!r}; choose one of: {DP_LEVELS}")
        for name in ("num_rounds", "local_epochs", "batch_size", "min_clients"):
            if getattr(self, name) < 1:
                errors.append(f"{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            errors.append("lr must be positive")
        if self.lora_rank < 1:
            errors.append("lora-rank must be at least 1")
        if self.lora_alpha <= 0:
            errors.append("lora-alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            errors.append("lora-dropout must be in [0, 1)")
        if not 0 < self.fraction_train <= 1:
            errors.append("fraction-train must be in (0, 1]")
        if self.task in USER_TASKS and not self.classes:
            errors.append(f"task {self.task!r} needs 'classes' (comma-separated labels)")
        if self.task == "tabular" and not self.features:
            errors.append("task 'tabular' needs 'features' (comma-separated column order)")
        errors.extend(self._range_errors())
        errors.extend(_privacy_errors(self.privacy))
        if errors:
            # Validators collect every failure, then raise once.
            raise ConfigError("; ".join(errors))

    def _range_errors(self) -> list[str]:
        """Every number finite, every integer within its bound (NaN slips past ``<`` checks)."""
        errors = []
        for f in fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                errors.append(f"{key} must be a finite number, got {value!r}")
            elif f.name in INT_LIMITS and value > INT_LIMITS[f.name]:
                errors.append(f"{key} must be at most {INT_LIMITS[f.name]}, got {value}")
            elif f.name in ("image_size", "seed") and value < 0:  # others have their own floor
                errors.append(f"{key} must be at least 0, got {value}")
        return errors

    def _server_optimizer_errors(self) -> list[str]:
        """FedAvgM's settings; server optimizers compose with SecAgg+ and DP-SGD, not site DP."""
        errors = []
        if not 0 <= self.server_momentum < 1:
            errors.append("server-momentum must be in [0, 1)")
        if self.server_momentum_lr <= 0:
            errors.append("server-momentum-lr must be positive")
        if self.strategy in ("fedavgm", "fedadam") and self.privacy.dp == "site":
            # Flower's site-DP wrapper noises only the model the strategy returns; FedAvgM's
            # momentum buffer and FedAdam's moments and weights keep every earlier round's
            # noise-free mean, which later rounds re-release: one site's sensitivity exceeds
            # the C/m the noise is sized for, and the stated epsilon would not hold.
            errors.append(
                f"strategy {self.strategy!r} cannot run with site-level DP: its server "
                "optimizer state re-releases earlier rounds' noise-free means and the stated "
                "epsilon would not hold; use dp = 'record' (DP-SGD on each site)"
            )
        return errors

    def _robust_errors(self) -> list[str]:
        """Robust aggregation composes with DP-SGD on sites; not with SecAgg+ or site DP."""
        if self.strategy not in ROBUST_STRATEGIES:
            return []
        errors = []
        if self.privacy.secagg:
            errors.append(
                f"strategy {self.strategy!r} cannot run with SecAgg+: the server sees only the "
                "sum of the updates, and a robust aggregate needs each one"
            )
        if self.privacy.dp == "site":
            errors.append(
                f"strategy {self.strategy!r} cannot run with site-level DP: its noise is "
                "calibrated to the clipped mean, and the stated epsilon would not hold for "
                f"{self.strategy}; use dp = 'record' (DP-SGD on each site)"
            )
        f = self.byzantine_sites
        if f < 0:
            errors.append("byzantine-sites must be at least 0")
        need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(
            self.strategy, 0
        )
        if self.min_clients < need:
            errors.append(
                f"strategy {self.strategy!r} with byzantine-sites {f} needs min-clients of at "
                f"least {need}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            errors.append("trim-fraction must be in [0, 0.5)")
        return errors

    # --- Flower run config (flat, kebab-case) -------------------------------------------

    def to_flower(self) -> dict[str, str | int | float | bool]:
        """Flatten into Flower's run config: scalar values under kebab-case keys."""
        flat: dict[str, str | int | float | bool] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, PrivacyConfig):
                for pf in fields(value):
                    flat["privacy-" + pf.name.replace("_", "-")] = getattr(value, pf.name)
            else:
                flat[f.name.replace("_", "-")] = value
        return flat

    @staticmethod
    def from_flower(run_config: dict[str, Any]) -> "RunConfig":
        """Read Flower's run config back; unknown keys are ignored (Flower adds none)."""
        return RunConfig.from_mapping({k.replace("-", "_"): v for k, v in run_config.items()})

    @staticmethod
    def from_mapping(values: dict[str, Any]) -> "RunConfig":
        """Build from snake_case keys; ``privacy_*`` keys or a ``privacy`` table."""
        values = dict(values)
        privacy_table = values.pop("privacy", None) or {}
        if not isinstance(privacy_table, dict):
            raise ConfigError("config key 'privacy' must be a table ([privacy])")
        privacy_values = dict(privacy_table)
        for key in [k for k in values if k.startswith("privacy_")]:
            privacy_values[key.removeprefix("privacy_")] = values.pop(key)
        known = {f.name: f for f in fields(RunConfig)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        privacy = _coerce(PrivacyConfig, privacy_values)
        base = _coerce(RunConfig, {k: v for k, v in values.items() if k != "privacy"}, privacy)
        return base

    def replace(self, **changes: Any) -> "RunConfig":
        privacy_changes = changes.pop("privacy", None)
        privacy = self.privacy
        if privacy_changes:
            privacy = dataclasses.replace(privacy, **privacy_changes)
        return dataclasses.replace(self, privacy=privacy, **changes)

    def freezes_batchnorm_stats(self) -> bool:
        """Whether local training keeps BatchNorm running statistics at their initial values.

        Head and LoRA mode keep the frozen backbone's statistics anyway (its BatchNorm layers
        have no trainable parameters); this decides for BatchNorm layers that train.
        """
        if self.batchnorm_stats == "auto":
            return self.mode == "full" and bool(self.init_weights)
        return self.batchnorm_stats == "frozen"

    def class_list(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    def feature_list(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.features.split(",") if c.strip())


def _privacy_errors(p: PrivacyConfig) -> list[str]:
    """DP and SecAgg+ settings that make sense; a stated epsilon needs 0 < delta < 1."""
    errors = []
    for f in fields(p):
        value = getattr(p, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"privacy {f.name.replace('_', '-')} must be a finite number")
    if p.noise_multiplier < 0:
        errors.append("privacy noise-multiplier must be at least 0")
    if not p.clipping_norm > 0:
        errors.append("privacy clipping-norm must be positive")
    if not 0 < p.delta < 1:
        errors.append("privacy delta must be in (0, 1)")
    if p.epsilon_budget < 0:
        errors.append("privacy epsilon-budget must be at least 0 (0: no budget)")
    if not p.secagg_timeout > 0:
        errors.append("privacy secagg-timeout must be positive")
    if not p.secagg_clipping_range > 0:
        errors.append("privacy secagg-clipping-range must be positive")
    if not 1 <= p.secagg_quantization_range < 2**31:
        errors.append("privacy secagg-quantization-range must be in [1, 2^31)")
    # Flower's SecAgg+: 1 means "every sampled site" for both; otherwise shares > 2 and
    # 1 < threshold < shares (a threshold of 0 would reconstruct masks from nothing).
    shares, threshold = p.secagg_num_shares, p.secagg_threshold
    if shares != 1 and not 3 <= shares <= 100_000:
        errors.append("privacy secagg-num-shares must be 1 (all sites) or in [3, 100000]")
    if threshold != 1 and not (threshold >= 2 and (shares == 1 or threshold < shares)):
        errors.append(
            "privacy secagg-threshold must be 1 (all shares) or at least 2 and below "
            "secagg-num-shares"
        )
    return errors


def toml_value(value: object) -> str:
    """A scalar as a TOML value (run config values are str, int, float or bool)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _coerce(cls: Any, values: dict[str, Any], privacy: PrivacyConfig | None = None) -> Any:
    """Convert values to the dataclass's field types, with clear errors."""
    kwargs: dict[str, Any] = {}
    names = {f.name: f for f in fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {key.replace('_', '-')!r}")
        default = getattr(cls(), key) if cls is PrivacyConfig else names[key].default
        kind = type(default) if default is not dataclasses.MISSING else str
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif kind in (int, float, str):
                if kind is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = kind(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"config key {key.replace('_', '-')!r} must be {kind.__name__}, got {value!r}"
            ) from e
        kwargs[key] = value
    if privacy is not None:
        kwargs["privacy"] = privacy
    return cls(**kwargs)


def _env_values() -> dict[str, str]:
    """``FEDGE_NUM_ROUNDS=5`` -> ``{"num_rounds": "5"}``; FEDGE_PRIVACY_DP -> privacy_dp."""
    known = {f.name for f in fields(RunConfig)} | {
        "privacy_" + f.name for f in fields(PrivacyConfig)
    }
    values = {}
    for name, value in os.environ.items():
        if name.startswith("FEDGE_"):
            key = name.removeprefix("FEDGE_").lower()
            if key in known:
                values[key] = value
    return values


def _flatten_toml(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key == "privacy" and isinstance(value, dict):
            for pkey, pvalue in value.items():
                flat["privacy_" + pkey.replace("-", "_")] = pvalue
        else:
            flat[key] = value
    return flat


def load_run_config(path: Path | str | None = None, **flags: Any) -> RunConfig:
    """Defaults < TOML file < FEDGE_* environment < flags (None flags are ignored).

    The TOML file has top-level keys (kebab or snake case) and an optional
    ``[privacy]`` table; see ``examples/run.toml``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory; give the run config's .toml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values.update(_flatten_toml(tomllib.loads(path.read_text(encoding="utf-8"))))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    values.update(_env_values())
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig.from_mapping(values)
