"""The compaction journal: every run the watcher finishes is recorded with its
detection-to-done time, the newest first, and only the newest ``keep`` are kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from compaction.journal import Journal
from compaction.policy import Done, Task
from compaction.watcher import Watcher
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.compaction.test_watcher import _fragment_old_day


def test_the_watchers_runs_are_journaled_with_their_detection_to_done_time(
    store: EmbeddedStore, settings: Settings, registry: SpecRegistry
) -> None:
    _fragment_old_day(store)
    now = [datetime.now(UTC) + timedelta(seconds=settings.compaction.debounce_s + 1)]
    watcher = Watcher(settings, registry, store, clock=lambda: now[0])
    done = watcher.tick()
    assert done, "the fragmented old day is due"
    runs = Journal(settings.compaction_journal_path).recent()
    assert [(r.datasource, r.partition, r.kind) for r in runs] == [
        (d.task.datasource, d.task.partition, d.task.kind) for d in reversed(done)
    ]
    late = next(r for r in runs if r.datasource == "payments")
    assert late.partition == "2026-01-10" and late.kind == "late" and late.segments_in == 11
    assert late.rows_in is not None and late.rows_out == 50
    expected = next(d for d in done if d.task.datasource == "payments").detect_to_done_s
    assert late.detect_to_done_s == expected and expected is not None and expected > 0


def test_only_the_newest_runs_are_kept(settings: Settings) -> None:
    journal = Journal(settings.compaction_journal_path, keep=3)
    at = datetime(2026, 11, 1, tzinfo=UTC)
    for i in range(5):
        task = Task("payments", f"2026-10-0{i + 1}", "late", (1, 2), 100, at)
        journal.record(Done(task, None, at + timedelta(seconds=i + 1), at))
    assert [r.partition for r in journal.recent()] == ["2026-10-05", "2026-10-04", "2026-10-03"]
    assert [r.detect_to_done_s for r in journal.recent(2)] == [5.0, 4.0]
    assert journal.recent(datasource="payments_daily") == []


def test_no_journal_yet_reads_as_no_runs(settings: Settings) -> None:
    assert Journal(settings.data_dir / "absent.sqlite").recent() == []
