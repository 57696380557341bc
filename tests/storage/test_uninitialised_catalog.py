"""A reader started before the first writer reads an empty store, never an error.

``make bench SCALE=full`` once ended because a progress poller read the catalog
while the ingester was still creating its tables ("no such table: offsets"). Every
reader — the in-process reader the API and ``tally sql`` use, the bench poller's
read-only catalog, the status commands — must see no catalog, an empty file, or a
catalog whose writer is still initialising it as empty; and the same reader, not
reopened, must see what the writer commits next.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from storage.embedded.catalog import _SCHEMA, Catalog
from storage.embedded.reader import EmbeddedReader
from storage.embedded.store import EmbeddedStore
from storage.protocol import IngestFigures, OffsetRange
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.cli import tally
from tests.factories import T0, payment

TOPIC = "payments.v1"
STARTS = ("no catalog", "empty file", "schemaless database", "writer initialising")


def _prepare(path: Path, start: str) -> sqlite3.Connection | None:
    """The catalog as a reader may find it before the first writer is done with it.
    "writer initialising": another connection holds the schema transaction open."""
    if start == "empty file":
        path.touch()
    if start in ("schemaless database", "writer initialising"):
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        if start == "schemaless database":
            con.close()
            return None
        con.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                con.execute(statement)
        return con  # uncommitted
    return None


def _assert_empty(reader: EmbeddedReader, settings: Settings, rollup: str) -> None:
    from bench.ingest import progress

    assert reader.query("SELECT count(*) FROM payments").rows == [[0]]
    assert reader.query(f"SELECT count(*) FROM {rollup}").rows == [[0]]
    assert reader.query("SELECT count(*) FROM raw.payments").rows == [[0]]
    assert reader.freshness("payments") is None
    assert reader.ingest_figures("payments") == IngestFigures({}, {}, {}, None)
    assert reader.partition_groups("payments") == []
    assert reader.lookup("payments", ["t1"]).num_rows == 0
    assert reader.rollup_state(rollup).num_rows == 0
    assert progress(settings, reader.registry, "olap", TOPIC, [0]) == 0  # the bench poller


@pytest.mark.parametrize("start", STARTS)
def test_a_reader_started_before_the_writer_reads_empty_then_sees_its_commit(
    settings: Settings, registry: SpecRegistry, start: str
) -> None:
    rollup = registry.get("payments").rollups[0].name
    initialising = _prepare(settings.catalog_path, start)
    reader = EmbeddedReader(settings, registry)
    try:
        _assert_empty(reader, settings, rollup)
        if initialising is not None:
            initialising.execute("COMMIT")
            initialising.close()
            _assert_empty(reader, settings, rollup)  # initialised, nothing committed yet
        assert start != "no catalog" or not settings.catalog_path.exists()  # not created

        store = EmbeddedStore(settings, registry)
        try:
            rows = [payment("t1"), payment("t2", approved_at=T0 + timedelta(days=1))]
            store.commit("payments", rows, {(TOPIC, 0): OffsetRange(0, 2)})
        finally:
            store.close()

        assert reader.query("SELECT count(*) FROM payments").rows == [[2]]
        assert reader.query(f"SELECT count(*) > 0 FROM {rollup}").rows == [[True]]
        assert reader.freshness("payments") is not None
        figures = reader.ingest_figures("payments")
        assert figures.offsets == {(TOPIC, 0): 2} and figures.datasets["payments"][1] == 2
        assert len(reader.partition_groups("payments")) == 2
        assert reader.lookup("payments", ["t1"]).num_rows == 1
    finally:
        reader.close()


def test_a_read_only_catalog_reads_a_schemaless_file_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.touch()
    catalog = Catalog(path, readonly=True)
    try:
        with catalog.read():
            assert catalog.generation() == 0
            assert catalog.live_segments() == []
            assert catalog.offsets("payments") == {}
            assert catalog.stats_rows(None) == []
            assert catalog.newest_event_at("payments") is None
            assert catalog.dead_letter_counts("payments") == {}
            assert catalog.pending_dead_letters("payments") == []
        # A reader never creates the schema: the file still has no table.
        con = sqlite3.connect(path)
        assert con.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
        con.close()
    finally:
        catalog.close()


@pytest.mark.parametrize("start", ("no catalog", "empty file"))
def test_operator_commands_on_an_uninitialised_catalog_report_nothing(
    settings: Settings, registry: SpecRegistry, data_dir: Path, start: str
) -> None:
    path = settings.catalog_path
    _prepare(path, start)
    sql = tally("sql", "SELECT count(*) AS n FROM payments", "--format", "json", data_dir=data_dir)
    assert sql.code == 0, sql.err
    assert sql.json() == {"columns": ["n"], "rows": [[0]]}
    assert start != "no catalog" or not path.exists()  # `tally sql` is only a reader

    compaction = tally("compaction", "status", "--format", "json", data_dir=data_dir)
    assert compaction.code == 0, compaction.err
    assert compaction.json() == {"partitions": []}

    rollups = tally("rollups", "status", "--format", "json", data_dir=data_dir)
    assert rollups.code == 0, rollups.err
    assert rollups.json()["rollups"] and all(r["rows"] == 0 for r in rollups.json()["rollups"])

    store = EmbeddedStore(settings, registry)
    try:
        store.commit("payments", [payment("t1")], {(TOPIC, 0): OffsetRange(0, 1)})
    finally:
        store.close()
    sql = tally("sql", "SELECT count(*) AS n FROM payments", "--format", "json", data_dir=data_dir)
    assert sql.json() == {"columns": ["n"], "rows": [[1]]}
