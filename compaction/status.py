"""What ``tally compaction status`` and the console show per partition: live segments,
rows, bytes, late rows since the last compaction, when it was last compacted, whether a
compaction is due, and why its files are damaged if they are (sizes are checked on the
way: a file lost since the last check shows at once)."""

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
        found = store.check_files(full=False, found_by="status")
    finally:
        store.close()
    damaged = {(d.datasource, d.partition): d.reason for d in found}
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
            "damaged": damaged.get((s.datasource, s.partition)),
        }
        for s, d in zip(stats, due, strict=True)
    ]
