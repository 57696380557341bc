"""A real OpenSearch for the tests (``tally engines up opensearch``), once per session."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

import engines
from engines.opensearch import OpenSearchEngine
from tally.errors import EngineUnavailable
from tests.brokers import missing_tools, not_available


class OpenSearch:
    """A running OpenSearch node: its URL and its engine (to stop or restart it)."""

    def __init__(self, data_dir: Path) -> None:
        engine = engines.get("opensearch", data_dir)
        assert isinstance(engine, OpenSearchEngine)
        self.engine = engine
        self.keep = False
        engine.up()
        assert engine.url is not None
        self.url = engine.url

    def delete(self, pattern: str) -> None:
        """Delete the indices matching ``pattern`` (a test's prefix and ``*``). The node
        is brought up first: a test that killed it leaves the session's node running
        for the next one (``up`` returns at once when it answers)."""
        self.engine.up()
        httpx.delete(f"{self.url}/{pattern}", params={"expand_wildcards": "all"}, timeout=60)

    def stop(self) -> None:
        if not self.keep:
            self.engine.stop()


def start_opensearch(where: Path) -> OpenSearch:
    """OpenSearch under ``where``; a skip (or a failure) with the reason where it cannot
    run. ``TALLY_TEST_OPENSEARCH_DIR`` (a developer's loop): that data dir instead,
    left running after the session."""
    kept = os.environ.get("TALLY_TEST_OPENSEARCH_DIR")
    if kept:
        where = Path(kept)
    if (reason := missing_tools("opensearch")) is not None:
        not_available(reason)
    try:
        running = OpenSearch(where)
    except EngineUnavailable as exc:
        not_available(exc.message)
        raise
    running.keep = bool(kept)
    return running
