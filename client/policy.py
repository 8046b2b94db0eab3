"""A site's privacy policy, enforced by the site on every round whatever the run config says.

The policy is a TOML file in the site's folder (``policy.toml``, set with
``fedge client policy``) or given with ``fedge client start --policy FILE``::

    require = ["record"]          # DP levels this site accepts: none, record, site
    min-noise-multiplier = 1.0    # refuse runs with less noise
    max-epsilon-per-run = 5.0     # 0: no limit
    lifetime-epsilon = 10.0       # this site's total over all runs (0: no limit) ...
    delta = 1e-5                  # ... stated at this delta
    require-secagg = false
    tasks = ["digits"]            # accepted task names ([]: any)
    models = ["cnn"]              # accepted model names ([]: any)
    evaluate = true               # answer federated-evaluation requests

``check_run`` runs before the site loads any data; ``admit_round`` checks the round's
privacy cost against the ledger (``fedge.client.ledger``) and records it before any
training, so that the update can never leave the site uncounted. A federated-evaluation
reply is recorded too (``record_evaluation``: counted, without epsilon, since nothing
noises it) before the site evaluates.
"""

import datetime
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedge.client.ledger import LedgerEntry, epsilon_of, load_ledger, locked, save_ledger
from fedge.shared.atomic import atomic_write_text
from fedge.shared.config import RunConfig, toml_value
from fedge.shared.errors import ConfigError, RunError

POLICY_NAME = "policy.toml"
DP_LEVELS = ("none", "record", "site")


class PolicyRefusal(RunError):
    """The site's policy refuses this run or round; the message says why."""


@dataclass(frozen=True)
class SitePolicy:
    """What a site accepts; the defaults accept everything and only keep the ledger."""

    require: tuple[str, ...] = DP_LEVELS
    min_noise_multiplier: float = 0.0
    max_epsilon_per_run: float = 0.0
    lifetime_epsilon: float = 0.0
    delta: float = 1e-5
    require_secagg: bool = False
    tasks: tuple[str, ...] = field(default_factory=tuple)
    models: tuple[str, ...] = field(default_factory=tuple)
    evaluate: bool = True

    def to_toml(self) -> str:
        """The policy as TOML (what ``fedge client policy`` writes)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if isinstance(value, tuple):
                lines.append(f"{key} = [{', '.join(toml_value(v) for v in value)}]")
            else:
                lines.append(f"{key} = {toml_value(value)}")
        return "\n".join(lines) + "\n"


def _from_mapping(data: dict[str, Any], source: str) -> SitePolicy:
    known = {f.name: f for f in fields(SitePolicy)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in known:
            raise ConfigError(f"{source}: unknown policy key {raw_key!r}")
        if key in ("require", "tasks", "models"):
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
                raise ConfigError(f"{source}: {raw_key} must be a name or a list of names")
            if key == "require" and not set(items) <= set(DP_LEVELS):
                raise ConfigError(f"{source}: require takes {', '.join(DP_LEVELS)}")
            kwargs[key] = tuple(items)
        elif key in ("require_secagg", "evaluate"):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {raw_key} must be true or false")
            kwargs[key] = value
        else:
            # NaN passes `value < 0` and then every later comparison is False: a NaN budget
            # or noise floor would silently enforce nothing.
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(f"{source}: {raw_key} must be a finite number >= 0")
            kwargs[key] = float(value)
    policy = SitePolicy(**kwargs)
    if not 0 < policy.delta < 1:
        raise ConfigError(f"{source}: delta must be between 0 and 1")
    return policy


def load_policy(path: Path | None) -> SitePolicy:
    """The policy in ``path``; the permissive default when there is no file.

    Raises
    ------
    ConfigError
        When the file is not valid TOML or holds an unknown or invalid key.
    """
    if path is None or not Path(path).exists():
        return SitePolicy()
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"policy file {path} is not valid TOML: {e}") from e
    except OSError as e:  # a directory, or no permission: fail closed, with the reason
        raise ConfigError(f"cannot read policy file {path}: {e.strerror}") from e
    return _from_mapping(data, str(path))


def update_policy(path: Path, **changes: Any) -> SitePolicy:
    """Apply ``changes`` (None values are ignored) to the policy in ``path`` and save it."""
    policy = load_policy(path)
    given = {k: v for k, v in changes.items() if v is not None}
    merged = {f.name: getattr(policy, f.name) for f in fields(policy)}
    merged.update(given)
    checked = _from_mapping(
        {k: list(v) if isinstance(v, tuple) else v for k, v in merged.items()}, str(path)
    )
    atomic_write_text(path, checked.to_toml(), mode=0o600)
    return checked


def check_run(policy: SitePolicy, cfg: RunConfig, site: str) -> None:
    """Refuse a run the policy does not accept; called before any data is loaded.

    Raises
    ------
    PolicyRefusal
        With the first reason found.
    """
    p = cfg.privacy
    reasons = []
    if p.dp not in policy.require:
        reasons.append(f"dp = {p.dp!r} is not allowed (policy requires {list(policy.require)})")
    if p.dp != "none" and p.noise_multiplier < policy.min_noise_multiplier:
        reasons.append(
            f"noise multiplier {p.noise_multiplier:g} is below the policy's minimum "
            f"{policy.min_noise_multiplier:g}"
        )
    if p.dp == "none" and (policy.lifetime_epsilon > 0 or policy.max_epsilon_per_run > 0):
        reasons.append("a run without DP has infinite epsilon and this site has a budget")
    if policy.require_secagg and not p.secagg:
        reasons.append("the policy requires SecAgg+ and the run does not use it")
    if policy.tasks and cfg.task not in policy.tasks:
        reasons.append(f"task {cfg.task!r} is not accepted")
    if policy.models and cfg.model not in policy.models:
        reasons.append(f"model {cfg.model!r} is not accepted")
    if reasons:
        raise PolicyRefusal(f"site {site} refuses by its policy: {reasons[0]}")


def round_entry(
    cfg: RunConfig, run_id: str, server_round: int, sample_rate: float, steps: int
) -> LedgerEntry:
    """The ledger entry for one training round of ``cfg`` at this site."""
    p = cfg.privacy
    site_level = p.dp == "site"
    return LedgerEntry(
        run_id=run_id,
        round=server_round,
        dp=p.dp,
        noise_multiplier=p.noise_multiplier if p.dp != "none" else 0.0,
        # Site-level: one Gaussian release per round, with rate 1 (an upper bound).
        sample_rate=1.0 if site_level else sample_rate,
        steps=1 if site_level else steps,
        task=cfg.task,
        model=cfg.model,
        at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def admit_round(
    policy: SitePolicy, ledger_path: Path, entry: LedgerEntry, site: str
) -> tuple[float, float]:
    """Check the round's cost against the policy and record it in the ledger, or refuse.

    Returns
    -------
    tuple[float, float]
        This run's epsilon and the site's lifetime epsilon, both including this round.

    Raises
    ------
    PolicyRefusal
        When the round would take the run or the site past the policy's limits; nothing is
        written then.
    """
    with locked(ledger_path):
        entries = load_ledger(ledger_path)
        this_run = [e for e in entries if e.run_id == entry.run_id] + [entry]
        run_eps = epsilon_of(this_run, policy.delta)
        total_eps = epsilon_of([*entries, entry], policy.delta)
        if policy.max_epsilon_per_run > 0 and run_eps > policy.max_epsilon_per_run:
            raise PolicyRefusal(
                f"site {site} refuses round {entry.round}: this run's epsilon would reach "
                f"{run_eps:.2f}, past the policy's {policy.max_epsilon_per_run:g} per run"
            )
        if policy.lifetime_epsilon > 0 and total_eps > policy.lifetime_epsilon:
            raise PolicyRefusal(
                f"site {site} refuses round {entry.round}: its lifetime epsilon would reach "
                f"{total_eps:.2f}, past its budget of {policy.lifetime_epsilon:g} "
                f"(delta {policy.delta:g})"
            )
        save_ledger(ledger_path, [*entries, entry])
    return run_eps, total_eps


def record_evaluation(ledger_path: Path, cfg: RunConfig | None, run_id: str) -> None:
    """Append one federated-evaluation reply of ``run_id`` to the ledger (no epsilon)."""
    entry = LedgerEntry(
        run_id=run_id,
        round=0,  # the evaluate message's round is not known here; the time is
        dp=cfg.privacy.dp if cfg else "none",
        noise_multiplier=0.0,
        sample_rate=0.0,
        steps=0,
        task=cfg.task if cfg else "",
        model=cfg.model if cfg else "",
        at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        kind="evaluate",
    )
    with locked(ledger_path):
        save_ledger(ledger_path, [*load_ledger(ledger_path), entry])


@dataclass(frozen=True)
class LedgerReport:
    """What ``fedge client privacy`` prints."""

    policy: SitePolicy
    runs: list[Any]
    total: float
    remaining: float | None  # None: no lifetime budget


def report(policy: SitePolicy, ledger_path: Path) -> LedgerReport:
    """The ledger's runs, their epsilon, the total and what remains of the budget."""
    from fedge.client.ledger import runs

    entries = load_ledger(ledger_path)
    total = epsilon_of(entries, policy.delta)
    remaining = None
    if policy.lifetime_epsilon > 0:
        remaining = max(policy.lifetime_epsilon - total, 0.0) if math.isfinite(total) else 0.0
    return LedgerReport(policy, runs(entries, policy.delta), total, remaining)


@dataclass
class SiteGuard:
    """The policy and ledger of one site, for one run: what the ClientApp consults."""

    site: str
    run_id: str
    policy: SitePolicy
    ledger: Path | None  # None: no ledger configured (Flower's simulation engine)
    run_cfg: RunConfig | None = None  # the run config ``check_run`` accepted

    @staticmethod
    def for_node(node_config: dict[str, Any], run_id: str) -> "SiteGuard":
        """Read the site's policy file named in its node config (set by the site only)."""
        from fedge.shared import records

        site = str(node_config.get(records.NODE_SITE, "site"))
        policy_path = str(node_config.get(records.NODE_POLICY, ""))
        ledger_path = str(node_config.get(records.NODE_LEDGER, ""))
        policy = load_policy(Path(policy_path) if policy_path else None)
        return SiteGuard(site, run_id, policy, Path(ledger_path) if ledger_path else None)

    def check_run(self, cfg: RunConfig) -> None:
        """Refuse the run before any data is loaded (see ``check_run``)."""
        check_run(self.policy, cfg, self.site)
        self.run_cfg = cfg

    def check_evaluate(self) -> None:
        """Refuse federated evaluation when the policy says so; else record the reply.

        The reply (loss, accuracy, example count, not noised) is counted in the ledger
        before the site evaluates, so it can never leave the site unrecorded.
        """
        if not self.policy.evaluate:
            raise PolicyRefusal(f"site {self.site} refuses by its policy: evaluate = false")
        if self.ledger is not None:
            record_evaluation(self.ledger, self.run_cfg, self.run_id)

    def admit(
        self, cfg: RunConfig, server_round: int, sample_rate: float, steps: int
    ) -> dict[str, float]:
        """Record this round in the ledger before training, or refuse; metrics to report."""
        if self.ledger is None:
            if self.policy.lifetime_epsilon > 0 or self.policy.max_epsilon_per_run > 0:
                raise PolicyRefusal(f"site {self.site}: a budget needs a ledger; none is set")
            return {}
        entry = round_entry(cfg, self.run_id, server_round, sample_rate, steps)
        run_eps, total_eps = admit_round(self.policy, self.ledger, entry, self.site)
        return {"site-run-epsilon": run_eps, "site-lifetime-epsilon": total_eps}
