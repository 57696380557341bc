"""SQLite failures leave the catalog as marked Tally errors naming the catalog file.

Real SQLite behaviour, no fakes: ``PRAGMA max_page_count`` makes the database full
for real (SQLITE_FULL, exactly what a full disk returns), a second connection holds
the write lock, a file of garbage is not a database. A full catalog must stop
ingestion with a one-line reason (terminal) — not be retried for ever, not crash the
writer as an "unexpected" bug; a lock must be retried (transient).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import orjson
import pytest

from ingest.decode import Message
from ingest.runner import Runner
from ingest.sinks import OlapSink
from producers.generate import GeneratorConfig, generate_events
from storage import DeadLetterRecord, OffsetRange
from storage.embedded.catalog import Catalog
from storage.embedded.store import EmbeddedStore
from tally.errors import StoreBusy, StoreError, StoreFileError, StoreFull
from tally.settings import Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.factories import payment

TOPIC = "payments.v1"
BIG = 256 * 1024  # needs many new pages: more than a full catalog may add


def _make_full(store: EmbeddedStore) -> None:
    """Forbid the catalog to grow: max_page_count cannot go below the current size,
    so asking for 1 pins it there (per connection; the store's own)."""
    store.core.catalog._con.execute("PRAGMA max_page_count = 1")


def _make_roomy(store: EmbeddedStore) -> None:
    store.core.catalog._con.execute("PRAGMA max_page_count = 1073741823")


def _letter(offset: int) -> DeadLetterRecord:
    return DeadLetterRecord(
        f"payments:{TOPIC}:0:{offset}", "payments", "olap", TOPIC, 0, offset, None,
        b"x" * BIG, "not JSON", 0.0,
    )  # fmt: skip


def test_a_full_catalog_fails_the_commit_with_a_terminal_one_line_error(
    store: EmbeddedStore, settings: Settings
) -> None:
    _make_full(store)
    offsets = {(TOPIC, 0): OffsetRange(0, 2)}
    with pytest.raises(StoreFull) as caught:
        store.commit("payments", [payment("t1")], offsets, dead_letters=[_letter(1)])
    err = caught.value
    assert not err.transient and err.code == "store_full"
    assert str(settings.catalog_path) in err.message and "\n" not in err.message
    assert "full" in err.message
    assert isinstance(err.__cause__, sqlite3.OperationalError)
    assert not list(settings.segments_dir.rglob("*.parquet"))  # its files were removed
    # Nothing was committed, and the connection is not left inside a transaction:
    # once there is room again the very same batch commits.
    assert store.stored_offsets("payments") == {}
    _make_roomy(store)
    result = store.commit("payments", [payment("t1")], offsets, dead_letters=[_letter(1)])
    assert result.rows_written == 1
    assert store.stored_offsets("payments") == {(TOPIC, 0): 2}


def _messages() -> list[Message]:
    events = generate_events(GeneratorConfig(transactions=3, cancel_rate=0, duplicate_rate=0))
    out = [
        Message(TOPIC, 0, i, str(ev["txn_id"]).encode(), orjson.dumps(ev))
        for i, ev in enumerate(events)
    ]
    poison = Message(TOPIC, 0, len(out), b"junk", b"{" * BIG)  # a dead letter to record
    return [*out, poison]


@pytest.fixture
def offline_settings(settings: Settings) -> Settings:
    """No broker: the runner's worker never needs one for these batches (the sink's
    dead-letter producer is created but has nothing to publish)."""
    return settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:9"})


def test_the_ingest_worker_stops_on_a_full_catalog_as_terminal_not_as_a_bug(
    offline_settings: Settings, registry: SpecRegistry
) -> None:
    spec = registry.get("payments")
    store = EmbeddedStore(offline_settings, registry)
    stop = threading.Event()
    sink = OlapSink(offline_settings, spec, store)
    runner = Runner(offline_settings, spec, sink, stop)
    messages = _messages()
    _make_full(store)
    worker = threading.Thread(target=runner._worker)
    worker.start()
    try:
        runner._hand_over(messages, {(TOPIC, 0): OffsetRange(0, len(messages))})
        runner._work.put(None)  # then finish
        worker.join(timeout=60)
        assert not worker.is_alive(), "the batch was retried: a full catalog counted as transient"
    finally:
        stop.set()
        worker.join()
        sink.close()
    assert isinstance(runner._failure, StoreFull), runner._failure
    assert stop.is_set()  # ingestion stops with the reason
    assert str(offline_settings.catalog_path) in runner._failure.message


def test_a_held_write_lock_is_a_transient_busy_error(
    settings: Settings, registry: SpecRegistry
) -> None:
    quick = settings.model_copy(update={"store": StoreSettings(busy_timeout_s=0.05)})
    store = EmbeddedStore(quick, registry)
    other = sqlite3.connect(settings.catalog_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreBusy) as caught:
            store.commit("payments", [payment("t1")], {(TOPIC, 0): OffsetRange(0, 1)})
        assert caught.value.transient
        assert str(settings.catalog_path) in caught.value.message
        other.execute("ROLLBACK")
        assert store.commit("payments", [payment("t1")]).rows_written == 1  # retry succeeds
    finally:
        other.close()
        store.close()


def test_read_after_a_failed_begin_raises_that_error_translated(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    catalog.close()
    with pytest.raises(StoreError) as caught, catalog.read():
        pytest.fail("the body ran without a transaction")
    assert isinstance(caught.value.__cause__, sqlite3.ProgrammingError)
    assert "begin read" in caught.value.message


def test_a_failed_begin_read_never_commits_an_open_transaction(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path)
    with pytest.raises(StoreError) as caught, catalog.write():
        catalog.check_and_set_offsets("payments", {(TOPIC, 0): (0, 5, None)})
        with catalog.read():  # BEGIN fails: a transaction is already open
            pytest.fail("the body ran")
    assert "begin read" in caught.value.message  # the first error, not a later one
    other = Catalog(path, readonly=True)
    with other.read():
        assert other.offsets("payments") == {}  # the write was rolled back, not committed
    other.close()
    catalog.close()


def test_a_file_that_is_not_a_database_is_a_terminal_file_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not a database\n" * 512)
    with pytest.raises(StoreFileError) as caught:
        Catalog(path)
    assert not caught.value.transient
    assert str(path) in caught.value.message and "\n" not in caught.value.message
