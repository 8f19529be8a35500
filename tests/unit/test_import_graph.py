"""The project's import graph: no cycles, and the library never imports the pipeline's tools.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
in ``agent/``, ``memory/`` and ``flows/``, module-level and function-local alike, except those
under ``if TYPE_CHECKING:`` (never executed). An edge goes to the module an import names: ``from
agent.meta import options`` reaches ``agent.meta.options``, ``from agent import LearningAgent``
reaches ``agent`` (its ``__init__``). Parent packages that Python runs on the way are not edges,
or every submodule would depend on everything its package's ``__init__`` re-exports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "memory", "flows")
PIPELINE_TOOLS = ("prefect", "mlflow", "dvc")
"""What only ``flows/`` may import: the library runs without the orchestration around it."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_checking: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, with whether it sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_checking)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_checking
        yield from _imports(node, type_checking)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from`` import names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """The absolute names an import statement reaches (modules, or ``package.name`` candidates)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = _absolute(node, module, is_package)
    for alias in node.names:
        yield f"{base}.{alias.name}" if alias.name != "*" else base
    yield base


def _graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """(project module -> {imported project module: line}, project module -> [(any import, line)])."""
    modules = _modules()
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    everything: dict[str, list[tuple[str, int]]] = {name: [] for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, type_checking in _imports(tree, False):
            targets = list(_targets(node, name, is_package))
            everything[name].extend((target, node.lineno) for target in targets)
            if type_checking:
                continue
            if isinstance(node, ast.ImportFrom):
                # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself.
                *names, base = targets
                reached = [t for t in names if t in modules] or ([base] if base in modules else [])
            else:
                reached = [t for t in targets if t in modules]
            for target in reached:
                if target != name:
                    edges[name].setdefault(target, node.lineno)
    return edges, everything


def _components(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module: the modules of each cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return components


def _cycle(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the first module of ``component``."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:  # breadth first, so the cycle is a shortest one through ``start``
        node = queue.pop(0)
        for target in sorted(edges[node]):
            if target == start:
                return [*paths[node], start]
            if target in members and target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    raise AssertionError(f"{component} is not strongly connected")


def _describe(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join([*steps, cycle[-1]])


def test_the_import_graph_has_no_cycles():
    edges, _ = _graph()
    components = _components(edges)
    assert not components, "import cycles (each module's line that imports the next):\n" + "\n".join(
        f"  {_describe(_cycle(c, edges), edges)}" + (f"\n    (all of {', '.join(c)})" if len(c) > 2 else "")
        for c in components
    )


def test_the_library_does_not_import_the_pipeline_tools():
    _, everything = _graph()
    offending = [
        f"  {module}: line {line} imports {target}"
        for module, imports in sorted(everything.items())
        if module.split(".")[0] == "agent"
        for target, line in imports
        if target.split(".")[0] in PIPELINE_TOOLS
    ]
    assert not offending, "agent/ must not import prefect, mlflow or dvc:\n" + "\n".join(offending)


def _reachable(edges: dict[str, dict[str, int]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or not, with one import path to it."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(edges[node]):
            if target not in paths:
                paths[target] = [*paths[node], target]
                queue.append(target)
    return paths


def test_training_never_imports_meta_learning():
    """Meta-learning sits above training (its trials run Trainers; online tuning is a callback)."""
    edges, _ = _graph()
    offending = []
    for module in sorted(m for m in edges if m == "agent.training" or m.startswith("agent.training.")):
        for target, path in _reachable(edges, module).items():
            if target == "agent.meta" or target.startswith("agent.meta."):
                offending.append("  " + " -> ".join(path))
                break
    assert not offending, "agent.training reaches agent.meta:\n" + "\n".join(offending)


def test_the_graph_reader_sees_local_imports_and_skips_type_checking_blocks():
    """The reader itself, on code written for it: a cycle through a function-local import counts,
    one through a TYPE_CHECKING import does not."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from agent.training import Trainer\n"
        "def f():\n"
        "    from .options import X\n"
    )
    tree = ast.parse(source)
    found = [
        (list(_targets(node, "agent.meta.online", False)), checking) for node, checking in _imports(tree, False)
    ]
    assert (["typing.TYPE_CHECKING", "typing"], False) in found
    assert (["agent.training.Trainer", "agent.training"], True) in found
    assert (["agent.meta.options.X", "agent.meta.options"], False) in found
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert _components(edges) == [["a", "b", "c"]]
    assert _cycle(["a", "b", "c"], edges) == ["a", "b", "c", "a"]
    assert _describe(["a", "b", "c", "a"], edges) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
