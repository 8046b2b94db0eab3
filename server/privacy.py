"""Privacy accounting and the privacy record that travels with the model.

Site-level DP (clip on each site, Gaussian noise on the server) is accounted
here with the RDP accountant of Google's ``dp-accounting`` package: each round
is a sampled Gaussian mechanism with noise multiplier sigma and sampling rate
q = sampled sites / total sites. Record-level DP (DP-SGD) is accounted on each
site by Opacus; the server reports the largest site epsilon.
"""

import math
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


def privacy_record(
    cfg: RunConfig,
    tls: bool,
    supernode_auth: bool,
    rounds: int,
    epsilon: float | None,
    sampled_clients: int,
    total_clients: int,
    per_site: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The privacy facts of a model, for summary.json, the model card and the bundle.

    Enough to recompute epsilon without the run: for site-level DP the sampling rate and
    the (unweighted) aggregation; for record-level DP each site's DP-SGD sample rate,
    steps per round and rounds (``per_site``).
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
            dp["sampling_rate"] = min(sampled_clients / max(total_clients, 1), 1.0)
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
