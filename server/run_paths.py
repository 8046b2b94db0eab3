"""Where a submitted run may write and read on the server: under the server's own folders.

Whoever submits a run (an admitted scientist, from another machine) chooses its run
folder (``run-dir``, written: metrics, checkpoints, summary), its ``init-weights`` and its
``eval-data`` (read). The ServerApp runs in the coordinator's account, so these paths are
confined before anything is created or opened. The server's folders are:

- ``runs``: ``START/runs`` (START: the working directory of ``fedge server start``,
  where the ServerApp resolves relative paths) and ``DATA_DIR/runs``;
- ``inputs`` (read only): ``START/inputs`` and ``DATA_DIR/inputs``, plus the ``runs``
  folders (an earlier run's model as initial weights);
- any folder the operator allows (``FEDGE_RUN_ROOTS``, os.pathsep-separated, in the
  environment of ``fedge server start``), for both.

A relative path is a sequence of plain names (letters, digits, ``.``, ``_``, ``-``, each
starting with a letter or digit: no ``..``) taken from START, so ``runs/exp1`` is
``START/runs/exp1``. Every path, relative or absolute, must then lie, with its symlinks
resolved, inside one of the folders above: a symlink out of them is refused. Built-in
data sets (``digits:test``) need no path.

The rules apply when the ServerApp runs under a SuperLink that fedge started (which
passes ``FEDGE_SERVER_DATA_DIR``); Flower's simulation engine and direct library use,
where the caller owns the machine, take the paths as given.
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path

from fedge.shared.config import RunConfig
from fedge.shared.errors import ConfigError

ENV_DATA_DIR = "FEDGE_SERVER_DATA_DIR"
ENV_START_DIR = "FEDGE_SERVER_START_DIR"
ENV_RUN_ROOTS = "FEDGE_RUN_ROOTS"
RUNS_SUBDIR = "runs"
INPUTS_SUBDIR = "inputs"
MAX_PARTS = 8
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PathNotAllowed(ConfigError):
    """A submitted path is outside the folders the server lets a run use."""


def _named(relative: str, base: Path, what: str) -> Path:
    parts = Path(relative).parts
    if not parts or len(parts) > MAX_PARTS or not all(_PART.fullmatch(p) for p in parts):
        raise PathNotAllowed(
            f"{what} {relative!r} is not a plain relative path: use names of letters, digits, "
            f"'.', '_' or '-' (each starting with a letter or digit), taken from {base}"
        )
    return base.joinpath(*parts)


def _inside(path: Path, roots: list[Path], what: str, given: str) -> Path:
    """``path`` resolved (symlinks followed), if it lies inside one of ``roots``."""
    if ".." in path.parts:
        raise PathNotAllowed(f"{what} {given!r} has a '..' part")
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    where = ", ".join(str(r) for r in roots)
    raise PathNotAllowed(
        f"{what} {given!r} is outside the folders this server lets a run use ({where})",
        hint=f"use a path under {roots[0]} (e.g. runs/NAME), or ask the operator to allow the "
        f"folder ({ENV_RUN_ROOTS} when starting the server)",
    )


def confine_run_paths(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> RunConfig:
    """``cfg`` with its run folder, weights and evaluation data confined (see the module doc).

    Raises
    ------
    PathNotAllowed
        With the path, the allowed folders and what to do instead.
    """
    env = os.environ if environ is None else environ
    data_dir = env.get(ENV_DATA_DIR, "")
    if not data_dir:
        return cfg
    home = Path(data_dir).resolve()
    start = Path(env.get(ENV_START_DIR) or os.getcwd()).resolve()
    extra = [Path(p) for p in env.get(ENV_RUN_ROOTS, "").split(os.pathsep) if p.strip()]
    extra = [p for p in extra if p.is_absolute()]
    runs = [start / RUNS_SUBDIR, home / RUNS_SUBDIR, *extra]
    readable = [start / INPUTS_SUBDIR, home / INPUTS_SUBDIR, *runs]
    changes: dict[str, str] = {
        "run_dir": str(_confine(cfg.run_dir, start, runs, "run folder")),
    }
    if cfg.init_weights:
        changes["init_weights"] = str(_confine(cfg.init_weights, start, readable, "init-weights"))
    if cfg.eval_data:
        changes["eval_data"] = _confine_spec(cfg.eval_data, start, readable)
    return cfg.replace(**changes)


def _confine(given: str, start: Path, roots: list[Path], what: str) -> Path:
    path = Path(given)
    if not path.is_absolute():
        path = _named(given, start, what)
    return _inside(path, roots, what, given)


def _confine_spec(spec_text: str, start: Path, roots: list[Path]) -> str:
    """A data spec with its file or folder confined; built-in sets pass as they are."""
    from fedge.shared.ml.data import DataSpec

    spec = DataSpec.parse(spec_text)
    if spec.is_builtin:
        return spec_text
    text = spec_text.strip()
    rest = text[len(spec.source) :]
    return str(_confine(spec.source, start, roots, "eval-data")) + rest
