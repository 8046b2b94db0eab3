"""Helpers for tests that run real federations on loopback."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedge.demo.loopback import LocalFederation
from fedge.shared.config import RunConfig
from fedge.shared.ml.checkpoint import save_checkpoint
from fedge.shared.ml.data import task_for_run
from fedge.shared.ml.models import build_model
from fedge.shared.processes import ProcessGroup


@contextmanager
def local_federation(
    work: Path, data_specs: list[str], secure: bool = False
) -> Iterator[LocalFederation]:
    """A started federation; every process is stopped when the block ends, however.

    Runs, weights and evaluation data may live beside ``work`` (in its parent folder), as
    the tests keep them: the server allows that folder (fedge.server.run_paths).
    """
    with ProcessGroup() as group:
        roots = (work.resolve().parent,)
        yield LocalFederation(work, data_specs, group, secure=secure, run_roots=roots).start()


def initial_weights(path: Path, model: str = "cnn", seed: int = 0) -> Path:
    """A fixed random initial model, so that runs compared with each other start alike."""
    torch.manual_seed(seed)
    cfg = RunConfig(model=model)
    task = task_for_run(cfg)
    save_checkpoint(path, build_model(model, task).state_dict(), 0, model, task, cfg.to_flower())
    return path
