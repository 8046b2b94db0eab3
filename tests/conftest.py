"""Shared fixtures: every test runs with its own FEDGE_HOME and FLWR_HOME."""

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_homes(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Keep keys, server state and Flower's config out of the user's home directory."""
    home = tmp_path_factory.mktemp("fedge-home")
    monkeypatch.setenv("FEDGE_HOME", str(home / "fedge"))
    monkeypatch.setenv("FLWR_HOME", str(home / "flwr"))
    yield home


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models: one thread beats two that fight other processes on a shared box.

    Used by the torch-heavy unit test modules (``pytestmark``), restored after each.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
