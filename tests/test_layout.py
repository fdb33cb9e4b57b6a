"""The house: the import graph of ewq/ (files as nodes, imports as edges) has no circle, and its
floors are climbed only downwards (at most one import from a lower floor to a higher one)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ewq"
# Lowest first; a module belongs to the floor of its longest listed prefix.
FLOORS = [
    ("ground: vocabulary and safe I/O", ["ewq", "ewq.errors", "ewq.console", "ewq.quant_types", "ewq.fileio",
                                         "ewq.processes"]),
    ("files and formats", ["ewq.weights", "ewq.twin", "ewq.assets", "ewq.data", "ewq.results", "ewq.llamacpp", "ewq.experts",
                           "ewq.rearranged"]),
    ("engines and metrics", ["ewq.backends", "ewq.metrics"]),
    ("measure and decide", ["ewq.sensitivity", "ewq.plan"]),
    ("apply and run", ["ewq.bnb_model", "ewq.bench"]),
    ("compare", ["ewq.study", "ewq.report"]),
    ("commands", ["ewq.commands"]),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own __init__ is not counted as an edge)."""
    found = modules()
    graph = {name: set() for name in found}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in found else base for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in found and t != name and not name.startswith(t + ".")}
    return graph


def floor_of(name: str) -> int:
    best = max(((len(prefix), level) for level, (_, prefixes) in enumerate(FLOORS) for prefix in prefixes
                if name == prefix or name.startswith(prefix + ".")), default=None)
    assert best is not None, f"{name} is on no floor: add it to FLOORS"
    return best[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circle():
    assert cycles(import_graph()) == []


def test_floors_are_climbed_down_only():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a))
    assert len(upward) <= 1, upward


def test_the_circle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


if __name__ == "__main__":  # the picture: floors, their modules, and any arrow back up
    graph = import_graph()
    for level, (title, _) in reversed(list(enumerate(FLOORS))):
        names = sorted(n for n in graph if floor_of(n) == level)
        print(f"{level} {title}: {', '.join(n.removeprefix('ewq.') for n in names)}")
    print("circles:", cycles(graph) or "none")
    print("upward:", sorted((a, b) for a, t in graph.items() for b in t if floor_of(b) > floor_of(a)) or "none")
