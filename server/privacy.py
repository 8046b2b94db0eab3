"""Privacy accounting and the privacy record that travels with the model.

Site-level DP (clip on each site, Gaussian noise on the server) is accounted
here with the RDP accountant of Google's ``dp-accounting`` package: each round
is a sampled Gaussian mechanism with noise multiplier sigma and sampling rate
q = sampled sites / total sites. The rate can change from round to round (sites come
and go), so every round's (q, sigma) is kept and the rounds are composed as what they
are: a sum of their RDP curves (``composed_epsilon``), never all at the last round's q.
Record-level DP (DP-SGD) is accounted on each site by Opacus; the server reports the
largest site epsilon.
"""

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fedge.shared.config import RunConfig

ACCOUNTANT = "rdp"


def site_level_epsilon(
    noise_multiplier: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """Epsilon after ``rounds`` rounds of the sampled Gaussian mechanism (RDP accountant).

    Flower samples a fixed number of sites per round; it is accounted as Poisson
    sampling with the same rate, the standard approximation (as Flower's own
    accountant does).
    """
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        min(sampling_rate, 1.0), dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def site_round(
    round_: int, sampled: int, available: int, noise_multiplier: float
) -> dict[str, Any]:
    """One site-level DP round as the privacy record keeps it (one Gaussian release)."""
    return {
        "round": int(round_),
        "sampling_rate": min(sampled / max(available, 1), 1.0),
        "noise_multiplier": float(noise_multiplier),
        "steps": 1,
    }


def composed_epsilon(rounds: Sequence[dict[str, Any]], delta: float) -> float:
    """Epsilon of site-level DP rounds with their own rates, composed (RDP accountant).

    Each round is a Poisson-sampled Gaussian event at its ``sampling_rate`` and
    ``noise_multiplier``; rounds with equal parameters are composed together.
    """
    if not rounds:
        return 0.0
    if any(float(r["noise_multiplier"]) <= 0 for r in rounds):
        return math.inf
    import dp_accounting

    steps: Counter[tuple[float, float]] = Counter()
    for r in rounds:
        key = (min(float(r["sampling_rate"]), 1.0), float(r["noise_multiplier"]))
        steps[key] += int(r.get("steps", 1))
    accountant = dp_accounting.rdp.RdpAccountant()
    for (q, z), n in sorted(steps.items()):
        accountant.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n
        )
    return float(accountant.get_epsilon(delta))


def privacy_record(
    cfg: RunConfig,
    tls: bool,
    supernode_auth: bool,
    rounds: int,
    epsilon: float | None,
    sampled_clients: int,
    total_clients: int,
    per_site: dict[str, dict[str, float]] | None = None,
    site_rounds: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The privacy facts of a model, for summary.json, the model card and the bundle.

    Enough to recompute epsilon without the run: for site-level DP every round's
    sampling rate, noise multiplier and steps (``per_round``, composed as a sum of RDP
    curves) and the (unweighted) aggregation; for record-level DP each site's DP-SGD
    sample rate, steps per round and rounds (``per_site``).
    """
    p = cfg.privacy
    dp: dict[str, Any] = {"level": p.dp}
    if p.dp != "none":
        dp.update(
            {
                "mechanism": "gaussian",
                "clipping_norm": p.clipping_norm,
                "noise_multiplier": p.noise_multiplier,
                "delta": p.delta,
                "epsilon": epsilon,
                "accountant": ACCOUNTANT,
                "rounds": rounds,
                "clients_sampled_per_round": sampled_clients,
                "clients_total": total_clients,
                "epsilon_budget": p.epsilon_budget or None,
                "unit": "one site's whole dataset" if p.dp == "site" else "one record of a site",
            }
        )
        if p.dp == "site":
            dp["aggregation"] = "unweighted mean of the sites' clipped models (weight 1 each)"
            # The largest rate of any round (with ``rounds``, an upper bound); the exact
            # per-round list is ``per_round``.
            rates = [float(r["sampling_rate"]) for r in site_rounds or []]
            dp["sampling_rate"] = max(rates or [min(sampled_clients / max(total_clients, 1), 1.0)])
            dp["per_round"] = [dict(r) for r in site_rounds or []]
        else:
            dp["per_site"] = dict(per_site or {})
    secagg: dict[str, Any] = {"enabled": p.secagg}
    if p.secagg:
        secagg.update(
            {
                "protocol": "SecAgg+",
                "num_shares": p.secagg_num_shares,
                "reconstruction_threshold": p.secagg_threshold,
                "clipping_range": p.secagg_clipping_range,
                "quantization_range": p.secagg_quantization_range,
            }
        )
    return {"tls": tls, "supernode_auth": supernode_auth, "secagg": secagg, "dp": dp}
