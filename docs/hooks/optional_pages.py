"""MkDocs hook: put the chapters other work streams add into the nav once their file exists.

These pages are written on other branches (edge serving and deployment, containers,
sovereign sites, models). Listing them in ``mkdocs.yml`` before they exist would break
``mkdocs build --strict``; leaving them out once they exist would too (``omitted_files``).
So the nav names them here, and each is added after "Deploy to devices" when present.
Any other page still has to be added to ``mkdocs.yml`` by hand.
"""

from pathlib import Path
from typing import Any

OPTIONAL = [
    ("Models", "models.md"),
    ("Edge serving", "edge-serving.md"),
    ("Edge deployment", "edge-deployment.md"),
    ("Containers", "containers.md"),
    ("Sovereign sites", "sovereign-sites.md"),
]
AFTER = "deployment.md"


def on_config(config: Any, **_: Any) -> Any:
    """Insert the optional pages that exist, once, after ``AFTER`` in the nav."""
    nav = config["nav"]
    docs = Path(config["docs_dir"])
    listed = {next(iter(item.values())) for item in nav if isinstance(item, dict)}
    position = next(
        (i + 1 for i, item in enumerate(nav) if isinstance(item, dict) and AFTER in item.values()),
        len(nav),
    )
    for title, page in OPTIONAL:
        if (docs / page).is_file() and page not in listed:
            nav.insert(position, {title: page})
            position += 1
    return config
