"""``tally verify``: compare every sink of a datasource with its topic; ``--repair``.

The expected state is re-derived from the topic (:mod:`compaction.logstate`) and
compared (:mod:`compaction.differences`) with the OLAP merged view, every rollup
(recomputed from the expected rows) and the search index. The search index is
compared by (version, event_id) and partition time per key — not by its text:
tantivy does not store the searchable fields, and search only proposes keys anyway
(the OLAP store supplies every field returned).

Like a replication verifier that runs behind live traffic, nothing is declared on
one look: whatever differs is re-read after ``recheck_s``, and is reported only if it
still differs and ingestion catching up does not explain it — a key whose latest
event lies at or beyond a sink's committed offset (or a sink ahead of what was read)
is counted under ``lagging``, not reported. A corrupt row is never explained by lag.

Repair is staged: OLAP rows first (``EmbeddedStore.repair`` rewrites the partitions
involved), then the rollups of every partition touched (``rebuild_rollups``, from the
now-repaired base), then search documents (``SearchIndex.replace``/``delete``). What
is reported as repaired was re-read and found fixed. With tantivy, repairing the
index needs the search ingester stopped (a shard has one writer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from compaction.check import Check, by_report_order
from compaction.differences import Difference
from compaction.logstate import read_log
from compaction.repair import repair_all
from search import open_index
from storage import open_reader
from tally.settings import Settings
from tally.specs import SpecRegistry


@dataclass
class VerifyReport:
    datasource: str
    topic: str
    events_read: int
    dead_lettered: int
    keys_checked: int
    differences: list[Difference] = field(default_factory=list)
    repaired: list[dict[str, Any]] = field(default_factory=list)
    lagging: dict[str, dict[str, Any]] = field(default_factory=dict)
    remaining: int = 0  # differences not repaired: the exit code is 1 when > 0
    notes: list[str] = field(default_factory=list)  # what a repair could not do, and why

    def as_dict(self) -> dict[str, Any]:
        return {
            "datasource": self.datasource,
            "topic": self.topic,
            "events_read": self.events_read,
            "dead_lettered": self.dead_lettered,
            "keys_checked": self.keys_checked,
            "differences": [d.as_dict() for d in self.differences],
            "repaired": self.repaired,
            "lagging": self.lagging,
            "remaining": self.remaining,
            "notes": self.notes,
        }


def verify(
    settings: Settings,
    registry: SpecRegistry,
    datasource: str,
    *,
    repair: bool = False,
    idle_s: float = 2.0,
    recheck_s: float = 1.0,
) -> VerifyReport:
    spec = registry.get(datasource)
    log = read_log(settings, spec, idle_s=idle_s)
    reader = open_reader(settings, registry)
    index = open_index(settings, spec, readonly=not repair)
    try:
        check = Check(settings, registry, spec, log, reader, index)
        report = VerifyReport(
            spec.name, log.topic, log.events, log.rejected, len(check.rows), check.compare_all()
        )
        if report.differences:
            time.sleep(recheck_s)  # a difference may be ingestion in flight: look again
        olap_at, search_at = check.committed()
        persisting = {d.ident for d in report.differences}
        again = check.again(report.differences) if report.differences else []
        report.differences = [d for d in again if d.ident in persisting]
        report.differences, report.lagging = check.lag(report.differences, olap_at, search_at)
        report.differences.sort(key=by_report_order)
        remaining = report.differences
        if repair and remaining:
            fixes, report.notes = repair_all(check, remaining)
            still = {d.ident for d in check.again(remaining)}
            remaining = [d for d in remaining if d.ident in still]
            report.repaired = [
                {**d.as_dict(), "action": fixes[d.ident]}
                for d in report.differences
                if d.ident not in still and d.ident in fixes
            ]
        report.remaining = len(remaining)
        return report
    finally:
        index.close()
        reader.close()
