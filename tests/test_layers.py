"""The import layering: model ← index_builder ← service ← coldwarm (the command line), never upwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "model": frozenset({"index_builder", "service", "coldwarm"}),
    "index_builder": frozenset({"service", "coldwarm"}),
    "service": frozenset({"coldwarm"}),
}


def imported_packages(path: Path) -> set[str]:
    """Top-level package names of every import in a file, lazy (in-function) imports included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_layer_imports_a_layer_above_it(package: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text("def f():\n    from service.settings import ServiceSettings\n    import coldwarm.cli\n")
    assert imported_packages(module) == {"service", "coldwarm"}
