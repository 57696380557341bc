"""The import graph stays acyclic and layered (``python -m tests.import_graph`` prints it)."""

from __future__ import annotations

from tests import import_graph as graph

# What each component may import (besides itself). Shared pieces at the bottom, the
# CLI root at the top; storage backends only ever see the contract.
ALLOWED = {
    "tally": set(),
    "storage": {"tally"},
    "storage.embedded": {"storage", "tally"},
    "storage.druid": {"storage", "tally"},
    "storage.starrocks": {"storage", "tally"},
    "search": {"tally"},
    "rollups": {"storage", "tally"},
    "ingest": {"storage", "search", "tally"},
    "producers": {"ingest", "storage", "tally"},
    "engines": {"tally"},
    "compaction": {"ingest", "search", "storage", "tally"},
    "query_api": {"compaction", "ingest", "rollups", "search", "storage", "tally"},
}


def test_no_component_and_no_module_is_part_of_an_import_cycle() -> None:
    assert graph.cycles(graph.component_graph()) == []
    assert graph.cycles(graph.module_graph()) == []


def test_every_component_imports_only_the_layers_below_it() -> None:
    components = graph.component_graph()
    unknown = set(components) - set(ALLOWED) - {graph.CLI_ROOT}
    assert not unknown, f"place {sorted(unknown)} in ALLOWED"
    for source, targets in components.items():
        if source != graph.CLI_ROOT:
            assert targets <= ALLOWED[source], (
                f"{source} imports {sorted(targets - ALLOWED[source])}"
            )


def test_only_the_backend_itself_imports_a_storage_backend() -> None:
    """(And the CLI root, which composes every package's subcommands: a backend's own
    CLI, such as ``tally druid``, is registered there like any other.)"""
    backends = {c for c in graph.component_graph() if c.startswith("storage.")}
    for source, targets in graph.component_graph().items():
        allowed = source in backends or source == graph.CLI_ROOT
        assert not (targets & backends) or allowed, f"{source} imports a backend"


def test_the_checker_sees_a_cycle_where_there_is_one() -> None:
    assert graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
