"""The package's import graph points one way (shared/DESIGN.md): no cycles, not even through
imports inside functions, and no module imports the package top (``mmea_calc/__init__.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmea_calc"


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mmea_calc":
                for alias in node.names:  # a submodule, or a name defined in the package top
                    module = alias.name if (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                    deps.add(module)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmea_calc."):
                deps.add(node.module.split(".")[1])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_module_imports_the_package_top():
    offenders = {m for m, deps in _graph().items() if "__init__" in deps and m != "__init__"}
    assert not offenders, f"these modules import names from mmea_calc/__init__.py: {offenders}"


def test_imports_have_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, dep])}")
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
