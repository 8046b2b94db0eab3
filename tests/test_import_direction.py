"""Imports point one way: server, client and edge use shared, never each other."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Package -> the fedge packages its modules may import (besides itself).
ALLOWED = {
    "shared": set(),
    "server": {"shared"},
    "client": {"shared"},
    "edge/build": {"shared", "edge/device"},  # validation runs the device runtime
    "edge/device": {"shared"},
}


def _fedge_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedge" and len(parts) > 1:
                package = "/".join(parts[1:3]) if parts[1] == "edge" else parts[1]
                found.add(package)
    return found


def test_imports_point_one_way() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in _fedge_imports(path) - allowed - {package}:
                if not imported.startswith(package + "/"):
                    wrong.append(f"{path.relative_to(ROOT)} imports fedge.{imported}")
    assert not wrong, wrong
