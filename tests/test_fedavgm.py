"""FedAvgM (Flower's server momentum): built from the config, validated, kept from site DP."""

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvgM

from fedge.server.strategies import build_strategy
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.errors import ConfigError


def _fit(vector: np.ndarray) -> tuple[None, FitRes]:
    return None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([vector]), 10, {})


def _build(cfg: RunConfig, start: np.ndarray) -> FedAvgM:
    initial = ndarrays_to_parameters([start])
    strategy = build_strategy(cfg, initial, lambda *a: None, lambda r: {}, None, None, 2)
    assert isinstance(strategy, FedAvgM)
    return strategy


def test_build_strategy_gives_fedavgm_with_the_configured_momentum() -> None:
    cfg = RunConfig(strategy="fedavgm", server_momentum=0.5, server_momentum_lr=1.0)
    strategy = _build(cfg, np.zeros(3))
    assert strategy.server_momentum == 0.5
    assert strategy.server_learning_rate == 1.0
    # The momentum is applied, not only stored: both rounds' sites step +1 from the global
    # model; round 1 moves it by 1, round 2 by 1 + 0.5 (momentum 0.5 times round 1's step).
    params, _ = strategy.aggregate_fit(1, [_fit(np.ones(3)), _fit(np.ones(3))], [])
    first = parameters_to_ndarrays(params)[0]
    np.testing.assert_allclose(first, np.ones(3))
    params, _ = strategy.aggregate_fit(2, [_fit(first + 1), _fit(first + 1)], [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], np.full(3, 2.5))


@pytest.mark.parametrize("momentum", [1.0, -0.1])
def test_invalid_server_momentum_is_a_one_line_config_error(momentum: float) -> None:
    with pytest.raises(ConfigError, match=r"server-momentum must be in \[0, 1\)") as err:
        RunConfig(strategy="fedavgm", server_momentum=momentum)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_server_optimizers_refuse_site_dp_compose_with_secagg_and_record_dp(strategy: str) -> None:
    with pytest.raises(ConfigError, match="cannot run with site-level DP"):
        RunConfig(strategy=strategy, privacy=PrivacyConfig(dp="site"))
    RunConfig(strategy=strategy, privacy=PrivacyConfig(dp="record", secagg=True))
    RunConfig(strategy="fedavgm", privacy=PrivacyConfig(dp="record", secagg=True))
    RunConfig(strategy="fedavg", privacy=PrivacyConfig(dp="site"))
