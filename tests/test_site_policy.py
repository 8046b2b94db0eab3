"""A site's privacy policy and ledger: refusals, composition across runs, file discipline."""

import json
import math
import stat
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedge.client.ledger import load_ledger, runs
from fedge.client.policy import (
    PolicyRefusal,
    SiteGuard,
    SitePolicy,
    check_run,
    load_policy,
    update_policy,
)
from fedge.shared import records
from fedge.shared.config import PrivacyConfig, RunConfig
from fedge.shared.errors import ConfigError, SecurityError

RECORD = RunConfig(privacy=PrivacyConfig(dp="record", noise_multiplier=1.0))


def test_static_refusals_name_the_reason() -> None:
    strict = SitePolicy(require=("record",), min_noise_multiplier=0.8, require_secagg=False,
                        tasks=("digits",), models=("cnn",))  # fmt: skip
    check_run(strict, RECORD, "a")
    cases = {
        "dp = 'none' is not allowed": RunConfig(),
        "below the policy's minimum": RunConfig(
            privacy=PrivacyConfig(dp="record", noise_multiplier=0.5)
        ),
        "task 'breast-cancer' is not accepted": RunConfig(
            task="breast-cancer", model="mlp", privacy=RECORD.privacy
        ),
        "model 'mlp' is not accepted": RunConfig(model="mlp", privacy=RECORD.privacy),
    }
    for reason, cfg in cases.items():
        with pytest.raises(PolicyRefusal, match=reason):
            check_run(strict, cfg, "a")
    with pytest.raises(PolicyRefusal, match="SecAgg"):
        check_run(SitePolicy(require_secagg=True), RECORD, "a")
    with pytest.raises(PolicyRefusal, match="infinite epsilon"):
        check_run(SitePolicy(lifetime_epsilon=5), RunConfig(), "a")


def test_policy_file_round_trip_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    assert load_policy(path) == SitePolicy()  # no file: accept anything, keep the ledger
    saved = update_policy(path, require=("record",), lifetime_epsilon=4.0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_policy(path) == saved and saved.require == ("record",)
    assert update_policy(path, delta=1e-6).lifetime_epsilon == 4.0  # other keys kept
    path.write_text('require = "site"\nunknown = 1\n')
    with pytest.raises(ConfigError, match="unknown policy key"):
        load_policy(path)
    path.write_text("lifetime-epsilon = -1\n")
    with pytest.raises(ConfigError):
        load_policy(path)


@pytest.mark.parametrize("key", ["lifetime-epsilon", "max-epsilon-per-run", "min-noise-multiplier"])
def test_a_nan_limit_is_refused_not_silently_unenforced(tmp_path: Path, key: str) -> None:
    """NaN passed `value < 0`, and a NaN budget or noise floor then refused nothing."""
    path = tmp_path / "policy.toml"
    path.write_text(f"{key} = nan\n")
    with pytest.raises(ConfigError, match="finite number"):
        load_policy(path)
    with pytest.raises(ConfigError, match="finite number"):
        update_policy(tmp_path / "other.toml", **{key.replace("-", "_"): math.nan})
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path)  # a directory: was an IsADirectoryError traceback


def _guard(tmp_path: Path, run_id: str, **policy: object) -> SiteGuard:
    ledger = tmp_path / "privacy-ledger.json"
    return SiteGuard("a", run_id, SitePolicy(**policy), ledger)  # type: ignore[arg-type]


def _independent(events: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = list(events)
    return float(accountant.get_epsilon(delta))


def test_lifetime_budget_composes_across_runs_and_stops_the_right_round(tmp_path: Path) -> None:
    q, steps, z = 0.05, 20, 1.0
    # Budget: exactly what 5 rounds cost, composed; run 1 takes 3, run 2 must stop at its 3rd.
    budget = _independent([(z, q, steps * 5)], 1e-5) * (1 + 1e-9)
    first = _guard(tmp_path, "run-1", lifetime_epsilon=budget)
    for r in (1, 2, 3):
        first.admit(RECORD, r, q, steps)
    second = _guard(tmp_path, "run-2", lifetime_epsilon=budget)
    metrics = second.admit(RECORD, 1, q, steps)
    second.admit(RECORD, 2, q, steps)
    assert metrics["site-run-epsilon"] == pytest.approx(_independent([(z, q, steps)], 1e-5))
    with pytest.raises(PolicyRefusal, match="refuses round 3: its lifetime epsilon"):
        second.admit(RECORD, 3, q, steps)
    entries = load_ledger(tmp_path / "privacy-ledger.json")
    assert [(e.run_id, e.round) for e in entries] == [
        ("run-1", 1), ("run-1", 2), ("run-1", 3), ("run-2", 1), ("run-2", 2),
    ]  # fmt: skip
    rows = runs(entries, 1e-5)
    assert [r.rounds for r in rows] == [3, 2]
    assert rows[0].epsilon == pytest.approx(_independent([(z, q, steps * 3)], 1e-5))
    assert stat.S_IMODE((tmp_path / "privacy-ledger.json").stat().st_mode) == 0o600


def test_per_run_limit_and_site_level_rounds(tmp_path: Path) -> None:
    site_cfg = RunConfig(privacy=PrivacyConfig(dp="site", noise_multiplier=2.0))
    one, two = _independent([(2.0, 1.0, 1)], 1e-5), _independent([(2.0, 1.0, 2)], 1e-5)
    guard = _guard(tmp_path, "r", max_epsilon_per_run=(one + two) / 2)
    guard.admit(site_cfg, 1, 0.01, 50)  # site-level: one release at rate 1, whatever q says
    with pytest.raises(PolicyRefusal, match="this run's epsilon"):
        guard.admit(site_cfg, 2, 0.01, 50)
    [entry] = load_ledger(tmp_path / "privacy-ledger.json")
    assert (entry.sample_rate, entry.steps) == (1.0, 1)


def test_no_dp_rounds_are_infinite_and_a_corrupt_ledger_fails_closed(tmp_path: Path) -> None:
    guard = _guard(tmp_path, "r")
    guard.admit(RunConfig(), 1, 1.0, 1)
    assert math.isinf(runs(load_ledger(tmp_path / "privacy-ledger.json"), 1e-5)[0].epsilon)
    (tmp_path / "privacy-ledger.json").write_text("{broken")
    with pytest.raises(SecurityError):
        guard.admit(RECORD, 2, 0.1, 1)


def test_a_ledger_swapped_for_a_link_or_another_file_fails_closed(tmp_path: Path) -> None:
    ledger = tmp_path / "privacy-ledger.json"
    ledger.symlink_to(tmp_path / "gone.json")  # dangling: not "no ledger yet"
    with pytest.raises(SecurityError, match="not a regular file"):
        load_ledger(ledger)
    ledger.unlink()
    ledger.write_text(json.dumps({"format": "something-else", "entries": []}))
    with pytest.raises(SecurityError, match="is not a fedge privacy ledger") as raised:
        load_ledger(ledger)
    assert "restore the privacy ledger" in raised.value.hint


def test_guard_reads_the_site_node_config(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('require = ["record"]\n')
    node = {records.NODE_SITE: "a", records.NODE_POLICY: str(policy),
            records.NODE_LEDGER: str(tmp_path / "l.json")}  # fmt: skip
    guard = SiteGuard.for_node(node, "7")
    assert guard.policy.require == ("record",) and guard.run_id == "7"
    with pytest.raises(PolicyRefusal):
        guard.check_run(RunConfig())
    json.dumps(guard.admit(RECORD, 1, 0.1, 2))


def test_evaluation_replies_are_counted_in_the_ledger_without_epsilon(tmp_path: Path) -> None:
    """Every evaluation reply is a release: counted before it leaves, outside the epsilon."""
    guard = _guard(tmp_path, "r")
    guard.check_run(RECORD)
    guard.admit(RECORD, 1, 0.1, 10)
    guard.check_evaluate()
    guard.check_evaluate()
    entries = load_ledger(tmp_path / "privacy-ledger.json")
    assert [e.kind for e in entries] == ["train", "evaluate", "evaluate"]
    assert (entries[1].dp, entries[1].task) == ("record", RECORD.task)
    (row,) = runs(entries, 1e-5)
    assert (row.rounds, row.evaluations) == (1, 2)
    # The evaluation replies do not change the DP epsilon (no noise to account) ...
    assert row.epsilon == pytest.approx(_independent([(1.0, 0.1, 10)], 1e-5))
    # ... and a site that evaluates nothing records nothing.
    quiet = _guard(tmp_path / "q", "r", evaluate=False)
    with pytest.raises(PolicyRefusal, match="evaluate = false"):
        quiet.check_evaluate()
    assert not (tmp_path / "q" / "privacy-ledger.json").exists()
