"""The package type-checks: mypy over every module (settings in pyproject's [tool.mypy])."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_is_clean(tmp_path: Path) -> None:
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    # The repository root is the package `fedge` (setuptools package-dir), which mypy cannot
    # see through the editable install: give it a search path where `fedge` is the root.
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "fedge").symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "MYPYPATH": str(tmp_path / "search")}
    done = subprocess.run(
        [
            mypy,
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "fedge",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path / "search",
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
