"""samkit's modules import each other without cycles, and the layers keep their direction.

The graph is read from the source (every ``import samkit...`` / ``from samkit... import`` at any depth of a module,
function-level imports included, since a cycle through a lazy import is still a cycle in the design). Importing a
submodule runs its package's ``__init__`` too; that implicit step is not an edge (a package that re-exports its
modules is not in a cycle with them)."""

from __future__ import annotations

import ast
from pathlib import Path

import samkit

ROOT = Path(samkit.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samkit"):
                # `from package import submodule` depends on the submodule; `from module import name` on the module
                names = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [n for n in names if n in modules] or [node.module]
                if len(targets) < len(names):
                    targets.append(node.module)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("samkit")]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50  # the whole package was read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_optim_and_step_never_import_experiments_or_the_cli():
    graph = import_graph()
    low_level = {"optim", "step", "losses", "sharpness", "data", "models"}
    offending = [
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if package_of(source) in low_level and package_of(target) in ("experiments", "cli")
    ]
    assert offending == []
