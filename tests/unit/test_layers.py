"""The layers of src/: only charm.py speaks Juju, and no import cycle joins the modules."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, function-local ones included, TYPE_CHECKING ones not."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _local(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def test_only_the_charm_imports_ops_or_the_charm_libraries() -> None:
    speaking = sorted(
        module
        for module, path in _modules().items()
        for name in _imports(module, path)
        if name == "ops" or name.startswith(("ops.", "charms."))
    )
    assert set(speaking) == {"charm"}


def test_the_modules_import_each_other_without_a_cycle() -> None:
    modules = _modules()
    graph = {
        module: {
            target
            for name in _imports(module, path)
            if (target := _local(name, modules)) not in (None, module)
        }
        for module, path in modules.items()
    }
    assert sum(map(len, graph.values())) > len(modules)  # the walk found the imports
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
