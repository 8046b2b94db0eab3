"""The docs site builds with ``mkdocs build --strict``; the README stays a front door."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_site_builds_strict_with_the_cli_reference(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="pip install mkdocs-material (the test extra)")
    pytest.importorskip("material", reason="pip install mkdocs-material (the test extra)")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    # Strict mode turns broken links and anchors, and pages left out of the nav, into errors.
    assert done.returncode == 0, done.stderr[-4000:]
    reference = (site / "cli" / "index.html").read_text(encoding="utf-8")
    from typer.main import get_command

    from fedge.cli import _register, app

    _register()
    root = get_command(app)
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        for sub in getattr(command, "commands", None) or [""]:
            title = f"fedge {name} {sub}".strip()
            assert f"Usage: {title} [OPTIONS]" in reference, f"{title} is not in the reference"


def test_readme_is_a_front_door_that_links_every_chapter() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 300
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to missing {target}"
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in re.findall(r":\s+([\w-]+\.md)$", nav, re.MULTILINE):
        assert f"docs/{page}" in readme or page == "index.md", f"README does not link {page}"
