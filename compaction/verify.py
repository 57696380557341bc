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

Stored files are checked first (sizes and digests, ``EmbeddedStore.check_files``): a
damaged partition is reported, left out of the comparison, and with ``--repair``
rebuilt from the log before anything is compared (``compaction.damage``); what the log
no longer holds is reported as lost, and rebuilt only with ``--accept-loss``.

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
from compaction.damage import Restoration, of_spec, restore_damaged
from compaction.differences import Difference
from compaction.logstate import LogState, read_log
from compaction.repair import repair_all
from search import SearchIndex, open_index
from storage import backend, open_reader, open_store
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry


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
    damage: Restoration | None = None  # damaged partitions: what was restored, what is lost

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
            "damage": None if self.damage is None else self.damage.as_dict(),
        }


def _damage(
    settings: Settings,
    registry: SpecRegistry,
    spec: DatasourceSpec,
    log: LogState,
    index: SearchIndex,
    *,
    repair: bool,
    accept_loss: bool,
) -> Restoration | None:
    """Every stored file of the datasource checked (sizes and digests); with
    ``repair``, damaged partitions restored from ``log`` (see ``compaction.damage``).
    None where the engine keeps its own files."""
    if not backend(settings.store.backend).capabilities.checks_files:
        return None
    store = open_store(settings, registry)
    try:
        found = of_spec(spec, store.check_files(full=True, found_by="verify"))
        if not found:
            return None
        if not repair:
            report = Restoration(spec.name, found)
            report.left = sorted({f"{d.datasource}/{d.partition}" for d in found})
            return report
        return restore_damaged(
            settings, store, spec, found, index=index, log_state=log, accept_loss=accept_loss
        )
    finally:
        store.close()


def _beyond_the_log(
    log: LogState, check: Check, diffs: list[Difference]
) -> tuple[list[Difference], list[str]]:
    """Where retention removed the start of the log, a key a sink holds and the log
    does not is no longer evidence of anything: it may be an event only retention
    removed. Such keys are not differences (a repair would delete real data): a note
    says how many and which offsets are gone."""
    unknown = [d for d in diffs if d.kind == "unexpected" and d.key not in check.rows]
    if not unknown:
        return diffs, []
    removed = log.removed
    if not removed:
        return diffs, []
    gone = ", ".join(f"[{p}] 0..{at - 1}" for p, at in sorted(removed.items()))
    keys = sorted({d.key for d in unknown if d.key is not None})
    note = (
        f"{len(keys)} key(s) held by a sink are not in the log, which no longer holds offsets"
        f" {gone} (retention): not compared, not repaired ({', '.join(keys[:5])}"
        f"{' …' if len(keys) > 5 else ''})"
    )
    return [d for d in diffs if d not in unknown], [note]


def verify(
    settings: Settings,
    registry: SpecRegistry,
    datasource: str,
    *,
    repair: bool = False,
    idle_s: float = 2.0,
    recheck_s: float = 1.0,
    accept_loss: bool = False,
) -> VerifyReport:
    spec = registry.get(datasource)
    log = read_log(settings, spec, idle_s=idle_s)
    reader = open_reader(settings, registry)
    index = open_index(settings, spec, readonly=not repair)
    try:
        damage = _damage(
            settings, registry, spec, log, index, repair=repair, accept_loss=accept_loss
        )
        check = Check(settings, registry, spec, log, reader, index, skip=reader.damaged())
        report = VerifyReport(
            spec.name, log.topic, log.events, log.rejected, len(check.rows), check.compare_all()
        )
        report.damage = damage
        if report.differences:
            time.sleep(recheck_s)  # a difference may be ingestion in flight: look again
        olap_at, search_at = check.committed()
        persisting = {d.ident for d in report.differences}
        again = check.again(report.differences) if report.differences else []
        report.differences = [d for d in again if d.ident in persisting]
        report.differences, report.lagging = check.lag(report.differences, olap_at, search_at)
        report.differences, beyond = _beyond_the_log(log, check, report.differences)
        report.differences.sort(key=by_report_order)
        report.notes += beyond
        remaining = report.differences
        if repair and remaining:
            fixes, notes = repair_all(check, remaining)
            report.notes += notes
            still = {d.ident for d in check.again(remaining)}
            remaining = [d for d in remaining if d.ident in still]
            report.repaired = [
                {**d.as_dict(), "action": fixes[d.ident]}
                for d in report.differences
                if d.ident not in still and d.ident in fixes
            ]
        report.remaining = len(remaining) + (len(damage.left) if damage is not None else 0)
        return report
    finally:
        index.close()
        reader.close()
