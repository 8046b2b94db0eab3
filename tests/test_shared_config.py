"""Run config: defaults < file < environment < flags, validation, Flower round trip."""

from pathlib import Path

import pytest

from fedge.server.flower_app_config import APP_DIR, render_app_pyproject
from fedge.shared.config import RunConfig, load_run_config
from fedge.shared.errors import ConfigError


def test_precedence_defaults_file_env_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "run.toml"
    config.write_text('num-rounds = 4\nlr = 0.1\nstrategy = "fedprox"\n[privacy]\ndp = "site"\n')
    monkeypatch.setenv("FEDGE_LR", "0.2")
    cfg = load_run_config(config, num_rounds=7)
    assert cfg.num_rounds == 7  # flag beats file
    assert cfg.lr == pytest.approx(0.2)  # environment beats file
    assert cfg.strategy == "fedprox"  # file beats default
    assert cfg.privacy.dp == "site"
    assert cfg.batch_size == RunConfig().batch_size  # default


def test_flower_round_trip_keeps_every_value() -> None:
    cfg = RunConfig(model="mlp", task="breast-cancer", num_rounds=9).replace(
        privacy={"dp": "record", "secagg": True, "noise_multiplier": 0.7}
    )
    flat = cfg.to_flower()
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert RunConfig.from_flower(flat) == cfg


def test_validation_collects_every_problem() -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig(task="nope", model="gpt", mode="lora", num_rounds=0)
    message = str(error.value)
    for word in ("unknown task", "unknown model", "unknown mode", "num-rounds"):
        assert word in message


def test_unknown_key_and_bad_types_are_clear(tmp_path: Path) -> None:
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("roundz = 3\n")
    with pytest.raises(ConfigError, match="unknown config keys: roundz"):
        load_run_config(bad_key)
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('num-rounds = "many"\n')
    with pytest.raises(ConfigError, match="num-rounds"):
        load_run_config(bad_type)
    with pytest.raises(ConfigError, match="not valid TOML"):
        bad = tmp_path / "c.toml"
        bad.write_text("= =")
        load_run_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.toml")


def test_user_tasks_need_classes() -> None:
    with pytest.raises(ConfigError, match="classes"):
        RunConfig(task="images")
    with pytest.raises(ConfigError, match="features"):
        RunConfig(task="tabular", model="mlp", classes="a,b")


def test_flower_app_pyproject_is_current() -> None:
    """Flower refuses run-config overrides of keys its app does not declare."""
    from fedge import __version__

    assert (APP_DIR / "pyproject.toml").read_text() == render_app_pyproject(__version__)


def test_flower_app_is_small(tmp_path: Path) -> None:
    """The FAB Flower ships holds the app's pyproject only, not the repository."""
    import os
    import subprocess
    import sys
    import zipfile

    flwr = Path(sys.executable).parent / "flwr"
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1"}
    done = subprocess.run(
        [str(flwr), "build", "--app", str(APP_DIR)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (fab,) = tmp_path.glob("*.fab")
    assert fab.stat().st_size < 4 * 1024
    names = zipfile.ZipFile(fab).namelist()
    assert [n for n in names if not n.startswith(".info/")] == ["pyproject.toml"]


def test_every_subpackage_is_packaged() -> None:
    """A folder missing from [tool.setuptools] packages would vanish from a wheel install."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    declared = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(("fedge", *p.parent.relative_to(root).parts)).rstrip(".")
        for p in root.rglob("__init__.py")
        if p.relative_to(root).parts[0] not in {"tests", ".git", ".venv", "build", "docker"}
    }
    assert found == declared


def test_example_run_config_loads() -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_run_config(root / "examples" / "run.toml")
    assert cfg.num_rounds == 5 and cfg.privacy.dp == "none"


@pytest.mark.parametrize(
    ("toml", "word"),
    [
        ("privacy = 5\n", "must be a table"),
        ("lr = nan\n", "lr must be a finite number"),
        ("num-rounds = 99999999999999999999\n", "num-rounds must be at most"),
        ("num-rounds = 1e300\n", "num-rounds must be at most"),
        ("image-size = 100000\n", "image-size must be at most"),
        ("seed = -1\n", "seed must be at least 0"),
        ("[privacy]\nnoise-multiplier = -1.0\n", "noise-multiplier must be at least 0"),
        ("[privacy]\ndelta = 7.0\n", "delta must be in (0, 1)"),
        ("[privacy]\nclipping-norm = nan\n", "clipping-norm"),
        ("[privacy]\nepsilon-budget = -1.0\n", "epsilon-budget"),
        ("[privacy]\nsecagg-timeout = -1.0\n", "secagg-timeout"),
        ("[privacy]\nsecagg-num-shares = 2\n", "secagg-num-shares"),
        ("[privacy]\nsecagg-threshold = 0\n", "secagg-threshold"),
        ("[privacy]\nsecagg-num-shares = 4\nsecagg-threshold = 4\n", "secagg-threshold"),
    ],
)
def test_out_of_range_values_are_refused_with_the_key(tmp_path: Path, toml: str, word: str) -> None:
    """A run config also arrives from the coordinator: NaN, huge and negative values fail."""
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_run_config(path)
    assert word in str(error.value)


def test_a_directory_as_config_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_run_config(tmp_path)
