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
