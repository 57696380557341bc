"""Tally's import graph, read from the source with ``ast``: which component imports which.

Run ``python -m tests.import_graph`` to print it (and any cycle); the test beside it
asserts it stays acyclic and layered. Every import counts, including those inside
functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.

Components are the top-level packages, with two refinements that make the layering
visible: each storage backend (``storage/<backend>/``) is a component of its own, so
backends are seen to depend on the contract and never the other way round; and the
CLI root (``tally.cli``, ``tally.demo``, ``tally.__main__``), which composes
everything, is apart from the shared pieces of ``tally`` (settings, errors, specs),
which sit below everything.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Container, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (
    "tally",
    "storage",
    "search",
    "rollups",
    "ingest",
    "producers",
    "engines",
    "compaction",
    "query_api",
)
CLI_ROOT = "tally.cli"
_ROOT_MODULES = {"tally.cli", "tally.demo", "tally.__main__"}
_BACKEND_PARENTS = {"storage"}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        base = ROOT / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def component(module: str) -> str:
    if module in _ROOT_MODULES:
        return CLI_ROOT
    parts = module.split(".")
    if parts[0] in _BACKEND_PARENTS and len(parts) > 1 and (ROOT / parts[0] / parts[1]).is_dir():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _imports(module: str, path: Path, known: Container[str]) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            for alias in node.names:  # a submodule imported from its package, or a name
                sub = f"{name}.{alias.name}"
                yield sub if sub in known else name


def module_graph() -> dict[str, set[str]]:
    """module → the project's modules it imports (names resolved to known modules)."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets: set[str] = set()
        for name in _imports(module, path, known):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def component_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, targets in module_graph().items():
        source = component(module)
        edges = graph.setdefault(source, set())
        edges.update(component(t) for t in targets if component(t) != source)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    graph = component_graph()
    for source in sorted(graph):
        print(f"{source:18} -> {', '.join(sorted(graph[source])) or '(nothing)'}")
    bad = cycles(graph) + cycles(module_graph())
    for group in bad:
        print("cycle: " + " <-> ".join(group))
    print("acyclic" if not bad else f"{len(bad)} cycle(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
