"""The watcher on a real store: late-written old partitions end in one segment, hot
partitions merge size-tiered, and no answer changes; the operator commands."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from compaction.watcher import Watcher
from storage import OlapReader
from storage.embedded.store import EmbeddedStore
from tally.settings import CompactionSettings, Settings
from tally.specs import SpecRegistry
from tests.cli import tally
from tests.factories import payment

OLD = datetime(2026, 1, 10, 3, tzinfo=UTC)  # 12:00 in Seoul


def _answers(reader: OlapReader) -> tuple[Any, ...]:
    return (
        reader.query("SELECT * FROM payments ORDER BY txn_id").rows,
        reader.query("SELECT * FROM payments_hourly ORDER BY ALL").rows,
        reader.query("SELECT * FROM payments_daily ORDER BY ALL").rows,
    )


def _segments(store: EmbeddedStore) -> dict[tuple[str, str], int]:
    return {(s.datasource, s.partition): s.segments for s in store.partition_stats()}


def _fragment_old_day(store: EmbeddedStore, cancels: int = 10) -> None:
    store.commit(
        "payments", [payment(f"t{i}", approved_at=OLD, merchant_id=f"m{i % 3}") for i in range(50)]
    )
    for i in range(cancels):
        store.commit(
            "payments",
            [payment(f"t{i}", 2, approved_at=OLD, merchant_id=f"m{i % 3}", canceled_amount=3_000)],
        )


def test_late_partitions_end_in_one_segment_once_quiet(
    store: EmbeddedStore, reader: OlapReader, settings: Settings, registry: SpecRegistry
) -> None:
    _fragment_old_day(store)
    before = _answers(reader)
    assert _segments(store)[("payments", "2026-01-10")] == 11
    now = [datetime.now(UTC)]
    watcher = Watcher(settings, registry, store, clock=lambda: now[0])
    assert [t.kind for t in watcher.due()] == []  # just written: debounced
    now[0] += timedelta(seconds=settings.compaction.debounce_s + 0.1)
    due = watcher.due()
    assert {(t.datasource, t.kind) for t in due} == {
        ("payments", "late"),
        ("payments_hourly", "late"),
        ("payments_daily", "late"),
    }
    done = watcher.tick()
    assert len(done) == 3
    assert all(n == 1 for n in _segments(store).values())
    assert _answers(reader) == before
    assert watcher.tick() == []  # nothing left to do


def test_a_partition_written_continuously_is_compacted_after_max_delay(
    store: EmbeddedStore, reader: OlapReader, settings: Settings, registry: SpecRegistry
) -> None:
    _fragment_old_day(store, cancels=3)
    written = datetime.now(UTC)
    # Writes keep coming (last write "now") but it fragmented max_delay_s ago.
    clock = written + timedelta(seconds=settings.compaction.max_delay_s + 0.1)
    watcher = Watcher(settings, registry, store, clock=lambda: clock)
    store.commit(
        "payments", [payment("t40", 2, approved_at=OLD, merchant_id="m1", canceled_amount=1)]
    )
    assert ("payments", "late") in {(t.datasource, t.kind) for t in watcher.due()}


def test_hot_partitions_merge_size_tiered_without_changing_answers(
    store: EmbeddedStore, reader: OlapReader, settings: Settings, registry: SpecRegistry
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    for i in range(12):
        rows = [payment(f"h{i}-{j}", approved_at=now, merchant_id=f"m{j % 4}") for j in range(5)]
        if i:
            rows.append(
                payment(f"h{i - 1}-0", 2, approved_at=now, merchant_id="m0", canceled_amount=500)
            )
        store.commit("payments", rows)
    before = _answers(reader)
    today = max(p for ds, p in _segments(store) if ds == "payments")
    assert _segments(store)[("payments", today)] == 12
    watcher = Watcher(settings, registry, store)
    while watcher.tick():
        pass
    assert {t.kind for d in watcher.report.done for t in [d.task]} == {"tiered"}
    after = _segments(store)[("payments", today)]
    assert 1 <= after < settings.compaction.min_merge  # 12 equal segments → merged
    assert _answers(reader) == before


def test_status_and_run_commands(store: EmbeddedStore, data_dir: Path) -> None:
    _fragment_old_day(store, cancels=4)
    store.close()
    status = tally("compaction", "status", "--format", "json", data_dir=data_dir)
    assert status.code == 0, status.err
    parts = {(p["datasource"], p["partition"]): p for p in status.json()["partitions"]}
    day = parts[("payments", "2026-01-10")]
    assert set(day) == {
        "datasource",
        "partition",
        "segments",
        "rows",
        "bytes",
        "late_rows",
        "last_compacted_at",
        "due",
        "damaged",
    }
    assert (
        day["segments"] == 5 and day["due"] is True and day["late_rows"] == 54
    )  # every write into an old day is late
    ran = tally(
        "compaction",
        "run",
        "--datasource",
        "payments",
        "--partition",
        "2026-01-10",
        "--format",
        "json",
        data_dir=data_dir,
    )
    assert ran.code == 0, ran.err
    assert ran.json()["compacted"][0]["replaced_segments"] == 5
    after = tally("compaction", "status", "--format", "json", data_dir=data_dir).json()
    day = next(
        p
        for p in after["partitions"]
        if p["partition"] == "2026-01-10" and p["datasource"] == "payments"
    )
    assert day["segments"] == 1 and day["due"] is False and day["late_rows"] == 0
    assert day["last_compacted_at"] is not None
    bad = tally("compaction", "run", "--partition", "2026-01-10", data_dir=data_dir)
    assert bad.code != 0 and "--datasource" in bad.err and "Traceback" not in bad.err
    for unknown in ("bogus", "2020-01-01"):  # not a key; a key with nothing stored
        ran = tally(
            "compaction", "run", "--datasource", "payments", "--partition", unknown,
            data_dir=data_dir,
        )  # fmt: skip
        assert ran.code == 1 and ran.out == "", ran.out
        line = ran.err.strip()
        assert line.startswith(f"error: payments has no stored partition {unknown!r}"), line
        assert "\n" not in line and "2026-01-10" in line


def test_settings_bound_the_policy() -> None:
    conf = CompactionSettings(min_merge=3, max_delay_s=2.0)
    assert conf.min_merge == 3 and conf.max_delay_s == 2.0


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_watch_daemon_compacts_and_stops_on_sigterm(
    store: EmbeddedStore, data_dir: Path, log_format: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    _fragment_old_day(store, cancels=3)
    daemon = subprocess.Popen(
        [
            *(sys.executable, "-m", "tally", "compaction", "watch"),
            *("--interval", "0.1", "--log-format", log_format),
        ],
        env={**os.environ, "TALLY_DATA_DIR": str(data_dir), "TALLY_STORE__GC_GRACE_S": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _segments(store)[("payments", "2026-01-10")] == 1:
                break
            time.sleep(0.05)
        assert _segments(store)[("payments", "2026-01-10")] == 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, err
    assert "watcher stopped: 3 compactions" in out  # base day + both rollup months
    records = [_log_record(line, log_format) for line in err.splitlines()]
    assert {"level": "INFO", "logger": "compaction.watcher"}.items() <= records[0].items()
    messages = [r["message"] for r in records]
    assert any(m.startswith("compacted payments/2026-01-10 (late)") for m in messages), err


_TEXT_LINE = re.compile(r"^(\S+) (INFO|WARNING|ERROR|DEBUG|CRITICAL) (\S+): (.*)$")


def _log_record(line: str, log_format: str) -> dict[str, str]:
    """A daemon's stderr line as {time, level, logger, message}; fails on any other line."""
    if log_format == "json":
        record = json.loads(line)
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record)
    else:
        match = _TEXT_LINE.match(line)
        assert match, line
        record = dict(zip(["time", "level", "logger", "message"], match.groups(), strict=True))
    assert datetime.fromisoformat(record["time"]).utcoffset() is not None, line
    return record


def test_watch_refuses_an_unknown_log_format(data_dir: Path) -> None:
    ran = tally("compaction", "watch", "--log-format", "xml", data_dir=data_dir)
    assert ran.code == 2
    assert ran.err.count("\n") == 1 and "--log-format" in ran.err and "xml" in ran.err, ran.err


def test_the_watcher_reports_what_is_due_and_done(
    store: EmbeddedStore, settings: Settings, registry: SpecRegistry
) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    _fragment_old_day(store)
    runs = value("tally_compaction_runs_total", datasource="payments", kind="late")
    rewritten = value("tally_compaction_bytes_rewritten_total", datasource="payments", kind="late")
    timed = value("tally_compaction_detect_to_done_seconds_count", datasource="payments")
    later = datetime.now(UTC) + timedelta(seconds=settings.compaction.max_delay_s + 1)
    watcher = Watcher(settings, registry, store, clock=lambda: later)
    watcher.due()
    assert value("tally_compaction_partitions_due", datasource="payments", kind="late") == 1
    assert value("tally_compaction_partitions_due", datasource="payments", kind="tiered") == 0
    watcher.tick()
    assert value("tally_compaction_runs_total", datasource="payments", kind="late") == runs + 1
    grown = value("tally_compaction_bytes_rewritten_total", datasource="payments", kind="late")
    assert grown - rewritten == sum(
        d.result.bytes_in
        for d in watcher.report.done
        if d.result and d.task.datasource == "payments"
    )
    assert (
        value("tally_compaction_detect_to_done_seconds_count", datasource="payments") == timed + 1
    )
    watcher.due()
    assert value("tally_compaction_partitions_due", datasource="payments", kind="late") == 0


def test_the_watcher_follows_the_engine_capabilities(
    store: EmbeddedStore, settings: Settings, registry: SpecRegistry
) -> None:
    from dataclasses import replace

    days = [datetime(2026, 1, d, 3, tzinfo=UTC) for d in (3, 4, 5)]  # cold, one file each
    for i, day in enumerate(days):
        store.commit("payments", [payment(f"p{i}", approved_at=day)])
    later = datetime.now(UTC) + timedelta(seconds=settings.compaction.pack_delay_s + 60)
    kinds = {t.kind for t in Watcher(settings, registry, store, clock=lambda: later).due()}
    assert "pack" in kinds  # the embedded engine packs cold days

    store.capabilities = replace(store.capabilities, packs=False)
    kinds = {t.kind for t in Watcher(settings, registry, store, clock=lambda: later).due()}
    assert "pack" not in kinds and kinds  # still compacts, never packs
    store.capabilities = replace(store.capabilities, manual_compaction=False)
    assert Watcher(settings, registry, store, clock=lambda: later).due() == []
