"""Imports point one way: server, client and edge use shared, never each other.

``shared/`` is the torch-free core that devices rely on; its torch part is
``shared/ml/``, which the core and the device side never import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Package -> the fedge packages its modules may import (besides itself).
ALLOWED = {
    "shared": set(),
    "shared/ml": {"shared"},
    "server": {"shared", "shared/ml"},
    # A site runs export's candidate artifacts with the device runtime (federated validation).
    "client": {"shared", "shared/ml", "edge/device"},
    "edge/export": {"shared", "shared/ml", "edge/device"},  # validation runs the device runtime
    "edge/device": {"shared"},
}


def _package_of(module: str) -> str | None:
    """``fedge.shared.ml.data`` -> ``shared/ml``; ``fedge.edge.device.x`` -> ``edge/device``."""
    parts = module.split(".")
    if parts[0] != "fedge" or len(parts) < 2:
        return None
    if parts[1] == "edge" or (parts[1] == "shared" and parts[2:3] == ["ml"]):
        return "/".join(parts[1:3])
    return parts[1]


def _fedge_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found |= {package for name in names if (package := _package_of(name))}
    return found


def _modules_of(package: str) -> list[Path]:
    """The package's own files, without its subpackages that have rules of their own."""
    nested = [ROOT / other for other in ALLOWED if other.startswith(package + "/")]
    return [
        path
        for path in sorted((ROOT / package).rglob("*.py"))
        if not any(path.is_relative_to(sub) for sub in nested)
    ]


def test_imports_point_one_way() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in _modules_of(package):
            for imported in _fedge_imports(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports fedge.{imported}")
    assert not wrong, wrong


def test_the_rule_catches_a_wrong_import(tmp_path: Path) -> None:
    """The checker sees a core module reaching into the torch part, at any depth."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from fedge.shared.ml.models import build_model\n")
    assert _fedge_imports(module) == {"shared/ml"}
    assert "shared/ml" not in ALLOWED["shared"] | ALLOWED["edge/device"]
