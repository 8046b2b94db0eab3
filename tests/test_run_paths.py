"""Paths a submitter chooses stay inside the server's folders (fedge.server.run_paths)."""

import os
from pathlib import Path

import pytest

from fedge.server.run_paths import (
    ENV_DATA_DIR,
    ENV_RUN_ROOTS,
    ENV_START_DIR,
    PathNotAllowed,
    confine_run_paths,
)
from fedge.server.superlink import SuperLinkSpec, superlink_environment
from fedge.shared.config import RunConfig


def _env(tmp_path: Path, *roots: Path) -> dict[str, str]:
    return {
        ENV_DATA_DIR: str(tmp_path / "server"),
        ENV_START_DIR: str(tmp_path / "start"),
        ENV_RUN_ROOTS: os.pathsep.join(map(str, roots)),
    }


def test_without_a_fedge_superlink_paths_are_as_given() -> None:
    cfg = RunConfig(run_dir="/anywhere/run", init_weights="/x.safetensors")
    assert confine_run_paths(cfg, {}) == cfg


def test_a_relative_run_folder_is_taken_from_the_servers_start_folder(tmp_path: Path) -> None:
    env = _env(tmp_path)
    out = confine_run_paths(RunConfig(run_dir="runs/exp1"), env)
    assert Path(out.run_dir) == (tmp_path / "start" / "runs" / "exp1").resolve()
    for bad in ("runs/../../escape", "runs/.hidden", "runs/exp\n", "runs/a b", "runs/-x"):
        with pytest.raises(PathNotAllowed, match="plain relative path"):
            confine_run_paths(RunConfig(run_dir=bad), env)
    # A plain name outside runs/ (e.g. next to the server's own files) is refused.
    with pytest.raises(PathNotAllowed, match="outside"):
        confine_run_paths(RunConfig(run_dir="exp1"), env)


def test_an_absolute_run_folder_must_be_in_an_allowed_folder(tmp_path: Path) -> None:
    data, allowed = tmp_path / "server", tmp_path / "shared-runs"
    env = _env(tmp_path, allowed)
    inside = data / "runs" / "a"
    assert confine_run_paths(RunConfig(run_dir=str(inside)), env).run_dir == str(inside.resolve())
    assert confine_run_paths(RunConfig(run_dir=str(allowed / "b")), env)
    with pytest.raises(PathNotAllowed, match=r"'\.\.' part"):
        confine_run_paths(RunConfig(run_dir=str(data / "runs" / ".." / "tls")), env)
    for outside in ("/etc/cron.d/x", str(tmp_path / "elsewhere"), str(data / "tls")):
        with pytest.raises(PathNotAllowed) as refused:
            confine_run_paths(RunConfig(run_dir=outside), env)
        assert outside in str(refused.value)
        # The hint says what to do: runs/NAME, or the operator's allowed folders.
        assert ENV_RUN_ROOTS in (refused.value.hint or "")


def test_a_symlink_out_of_an_allowed_folder_is_refused(tmp_path: Path) -> None:
    runs = tmp_path / "start" / "runs"
    runs.mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (runs / "link").symlink_to(tmp_path / "secret", target_is_directory=True)
    with pytest.raises(PathNotAllowed, match="outside"):
        confine_run_paths(RunConfig(run_dir="runs/link"), _env(tmp_path))
    with pytest.raises(PathNotAllowed, match="outside"):
        confine_run_paths(RunConfig(run_dir=str(runs / "link" / "x")), _env(tmp_path))


def test_weights_and_eval_data_are_read_only_from_allowed_folders(tmp_path: Path) -> None:
    env = _env(tmp_path)
    start = tmp_path / "start"
    cfg = confine_run_paths(
        RunConfig(init_weights="inputs/base.safetensors", eval_data="inputs/held-out.csv#0/2"),
        env,
    )
    assert Path(cfg.init_weights) == (start / "inputs" / "base.safetensors").resolve()
    assert cfg.eval_data == str((start / "inputs" / "held-out.csv").resolve()) + "#0/2"
    earlier = tmp_path / "server" / "runs" / "old" / "model.safetensors"  # an earlier model
    assert confine_run_paths(RunConfig(init_weights=str(earlier)), env).init_weights
    assert confine_run_paths(RunConfig(eval_data="digits:test"), env).eval_data == "digits:test"
    for field, value in (("init_weights", "/etc/passwd"), ("eval_data", "/home/x/data.csv"),
                         ("init_weights", "../keys/signing.key"),
                         ("init_weights", "server/keys/signing.key")):  # fmt: skip
        with pytest.raises(PathNotAllowed):
            confine_run_paths(RunConfig(**{field: value}), env)


def test_the_superlink_tells_the_serverapp_where_runs_may_go(tmp_path: Path) -> None:
    spec = SuperLinkSpec(tmp_path / "server", run_roots=(tmp_path / "work",))
    env = superlink_environment(spec)
    assert env[ENV_DATA_DIR] == str((tmp_path / "server").resolve())
    assert env[ENV_START_DIR] == os.getcwd()
    assert str((tmp_path / "work").resolve()) in env[ENV_RUN_ROOTS].split(os.pathsep)
