"""Site-level DP with unequal sites: the mechanism applied is the one epsilon is stated for.

FedAvg weights updates by each site's ``num_examples``; Flower's DP wrapper adds noise
z*C/m, calibrated for an unweighted mean. A site holding 90 % of the examples would move
a weighted mean by 0.9*C, an effective noise multiplier of z/(0.9*m). fedge aggregates
site-DP rounds unweighted; these tests measure the sensitivity and the noise it applies.
"""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from fedge.server.privacy import privacy_record, site_level_epsilon
from fedge.server.strategies import build_strategy
from fedge.shared.config import PrivacyConfig, RunConfig

DIM = 20_000
CLIP = 1.0


def _fit(vector: np.ndarray, num_examples: int) -> tuple[None, FitRes]:
    params = ndarrays_to_parameters([vector.astype(np.float64)])
    return None, FitRes(Status(Code.OK, ""), params, num_examples, {})


def _aggregate(strategy: object, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    results = [_fit(a, 900), _fit(b, 100)]  # site A holds 90 % of the examples
    params, _ = strategy.aggregate_fit(1, results, [])  # type: ignore[attr-defined]
    return parameters_to_ndarrays(params)[0]


def _strategy(noise: float) -> object:
    cfg = RunConfig(
        min_clients=2,
        privacy=PrivacyConfig(dp="site", noise_multiplier=noise, clipping_norm=CLIP),
    )
    initial = ndarrays_to_parameters([np.zeros(DIM)])
    return build_strategy(cfg, initial, lambda *a: None, lambda r: {}, None, None, 2)


def test_one_site_moves_the_aggregate_by_at_most_c_over_m() -> None:
    rng = np.random.default_rng(0)
    b = rng.normal(size=DIM) * 0.01
    a = np.zeros(DIM)
    direction = rng.normal(size=DIM)
    a_changed = a + direction / np.linalg.norm(direction) * CLIP  # a change of norm C at A
    quiet = _strategy(noise=1e-12)
    moved = np.linalg.norm(_aggregate(quiet, a_changed, b) - _aggregate(quiet, a, b))
    assert moved == pytest.approx(CLIP / 2, rel=1e-6)  # C/m with m = 2, whatever A holds
    # The weighted mean FedAvg would compute moves by 0.9*C: what the fix prevents.
    weighted = FedAvg()
    moved_weighted = np.linalg.norm(_aggregate(weighted, a_changed, b) - _aggregate(weighted, a, b))
    assert moved_weighted == pytest.approx(0.9 * CLIP, rel=1e-6)


def test_applied_noise_over_sensitivity_is_the_stated_noise_multiplier() -> None:
    z = 0.8
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=DIM) * 0.01, rng.normal(size=DIM) * 0.01
    noisy = _aggregate(_strategy(noise=z), a, b)
    std = float(np.std(noisy - (a + b) / 2))
    sensitivity = CLIP / 2
    assert std / sensitivity == pytest.approx(z, rel=0.03)


def test_record_lets_anyone_recompute_epsilon_independently() -> None:
    cfg = RunConfig(privacy=PrivacyConfig(dp="site", noise_multiplier=1.1, delta=1e-5))
    rounds, sampled, total = 5, 2, 2
    eps = site_level_epsilon(1.1, sampled / total, rounds, 1e-5)
    record = privacy_record(cfg, True, True, rounds, eps, sampled, total)["dp"]
    assert record["aggregation"].startswith("unweighted mean")
    # Independent: Opacus' RDP accountant (another library) from the record's fields alone.
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(record["noise_multiplier"], record["sampling_rate"], record["rounds"])]
    independent = accountant.get_epsilon(record["delta"])
    assert record["epsilon"] == pytest.approx(independent, rel=0.02)


def test_a_round_with_fewer_updates_than_the_noise_is_sized_for_is_not_aggregated() -> None:
    """Noise z*C/m for m = 3 sites over a mean of 2 updates would be z*2/3 of the stated."""
    from fedge.server.strategies import NOT_AGGREGATED

    cfg = RunConfig(
        min_clients=3,
        privacy=PrivacyConfig(dp="site", noise_multiplier=1.0, clipping_norm=CLIP),
    )
    initial = ndarrays_to_parameters([np.zeros(DIM)])
    strategy = build_strategy(cfg, initial, lambda *a: None, lambda r: {}, None, None, 3)
    rng = np.random.default_rng(2)
    two = [_fit(rng.normal(size=DIM) * 0.01, 10) for _ in range(2)]
    params, metrics = strategy.aggregate_fit(1, two, [])
    assert params is None
    assert "sized for 3" in str(metrics[NOT_AGGREGATED])
    three = [*two, _fit(rng.normal(size=DIM) * 0.01, 10)]
    params, metrics = strategy.aggregate_fit(1, three, [])
    assert params is not None and NOT_AGGREGATED not in metrics


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """L2 norm of a - b over all arrays together (what clipping bounds)."""
    pairs = zip(a, b, strict=True)
    return float(np.sqrt(sum(np.sum((x - y).astype(np.float64) ** 2) for x, y in pairs)))


def test_a_site_clips_its_update_even_when_the_server_does_not_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No clipping norm in the fit config (a server without the DP wrapper): still clipped."""
    from fedge.client.site import Site
    from fedge.shared import records

    monkeypatch.setenv("FEDGE_DEVICE", "cpu")
    clip = 0.05
    cfg = RunConfig(model="cnn", mode="head", local_epochs=1, lr=0.5).replace(
        privacy={"dp": "site", "noise_multiplier": 1.0, "clipping_norm": clip}
    )
    site = Site(cfg, {records.NODE_SITE: "a", records.NODE_DATA: "digits:public"})
    start = [a.copy() for a in site.get_parameters()]
    out, weight, _ = site.fit(start, {records.CFG_SERVER_ROUND: 1})  # no "clipping_norm" key
    norm = _distance(out, start)
    assert norm == pytest.approx(clip, rel=1e-3)  # lr 0.5 moves it far more: clipped to C
    assert weight == 1 and all(o.dtype == s.dtype for o, s in zip(out, start, strict=True))
    # Without site-level DP the same training is not clipped.
    plain = Site(cfg.replace(privacy={"dp": "none"}), {records.NODE_DATA: "digits:public"})
    out, _, _ = plain.fit(start, {records.CFG_SERVER_ROUND: 1})
    assert _distance(out, start) > 10 * clip
