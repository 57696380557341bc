"""What ``tally compaction status`` and the console show per partition: live segments,
rows, bytes, late rows since the last compaction, when it was last compacted, and
whether a compaction is due."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from compaction.policy import is_due
from compaction.watcher import window_test
from storage import open_store
from tally.settings import Settings
from tally.specs import SpecRegistry
from tally.timeutil import utc_iso


def partition_status(
    settings: Settings, registry: SpecRegistry, datasource: str | None = None
) -> list[dict[str, Any]]:
    store = open_store(settings, registry)
    try:
        stats = store.partition_stats(datasource)
        now = datetime.now(UTC)
        old = window_test(registry, store)
        due = [is_due(s, old(s.datasource, s.partition, now)) for s in stats]
    finally:
        store.close()
    return [
        {
            "datasource": s.datasource,
            "partition": s.partition,
            "segments": s.segments,
            "rows": s.rows,
            "bytes": s.bytes,
            "late_rows": s.late_rows,
            "last_compacted_at": utc_iso(s.last_compacted_at),
            "due": d,
        }
        for s, d in zip(stats, due, strict=True)
    ]
