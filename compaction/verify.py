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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from sqlglot import exp

from compaction.differences import (
    Difference,
    Group,
    Row,
    compare_groups,
    compare_rows,
    compare_search,
    table_rows,
)
from compaction.logstate import (
    SOURCE_OFFSET,
    SOURCE_PARTITION,
    LogState,
    committed_offsets,
    read_log,
)
from rollups.deltas import SIGN, signed_deltas
from search import Doc, SearchIndex, open_index
from storage import OlapReader, open_reader
from storage.embedded.sqlgen import DIALECT
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry


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
        report.differences.sort(key=_order)
        remaining = report.differences
        if repair and remaining:
            fixes, report.notes = check.repair(remaining)
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


class Check:
    """The expected state of one datasource and how to compare sinks with it."""

    def __init__(
        self,
        settings: Settings,
        registry: SpecRegistry,
        spec: DatasourceSpec,
        log: LogState,
        reader: OlapReader,
        index: SearchIndex,
    ) -> None:
        self.settings, self.registry, self.spec, self.log = settings, registry, spec, log
        self.reader, self.index = reader, index
        ds = spec.datasource
        self.columns = list(spec.columns)
        rows = table_rows(log.rows, [*self.columns, SOURCE_PARTITION, SOURCE_OFFSET])
        key = self.columns.index(ds.key)
        self.rows: dict[str, Row] = {r[key]: r[: len(self.columns)] for r in rows}
        self.source: dict[str, tuple[int, int]] = {r[key]: (r[-2], r[-1]) for r in rows}
        self.groups = {r.name: self._expected_groups(r, log.rows) for r in spec.rollups}

    # --- reading the sinks --------------------------------------------------------------

    def _olap(self, keys: Iterable[str] | None = None) -> pa.Table:
        if keys is not None:
            return self.reader.lookup(self.spec.name, sorted(keys))
        return self.reader.arrow(_select_all(self.spec.name))

    def _expected_groups(self, rollup: Rollup, rows: pa.Table) -> dict[Group, tuple[int, ...]]:
        if not rows.num_rows:
            return {}
        signed = rows.append_column(SIGN, pa.repeat(pa.scalar(1, pa.int64()), rows.num_rows))
        return _groups(self.spec, rollup, signed_deltas(self.spec, rollup, signed))

    def _stored_groups(self, rollup: Rollup) -> dict[Group, tuple[int, ...]]:
        return _groups(self.spec, rollup, self.reader.arrow(_select_all(rollup.name)))

    def _search(self, keys: Iterable[str] | None = None) -> list[Difference]:
        found = self.index.all_versions()
        wanted = set(found) | set(self.rows) if keys is None else set(keys)
        ds = self.spec.datasource
        v, e, t = (self.columns.index(c) for c in (ds.version, ds.event_id, ds.time))
        expected = {k: (r[v], r[e], r[t]) for k, r in self.rows.items() if k in wanted}
        found = {k: f for k, f in found.items() if k in wanted}
        same = [k for k, f in found.items() if k in expected and f[0] == expected[k][0]]
        located = self.index.locate(same) if same else {}
        event_ids = not self.index.capabilities.external_versions
        return compare_search(expected, found, located, event_ids=event_ids)

    # --- comparing ----------------------------------------------------------------------

    def compare_all(self) -> list[Difference]:
        diffs = compare_rows(self.spec, self.rows, table_rows(self._olap(), self.columns))
        for rollup in self.spec.rollups:
            diffs += self._compare_rollup(rollup)
        return diffs + self._search()

    def _compare_rollup(self, rollup: Rollup) -> list[Difference]:
        metrics = [m.name for m in self.spec.parsed_metrics]
        columns = ["bucket", *rollup.dimensions]
        stored = self._stored_groups(rollup)
        return compare_groups(rollup.name, columns, metrics, self.groups[rollup.name], stored)

    def again(self, diffs: list[Difference]) -> list[Difference]:
        """Re-read what ``diffs`` are about and compare it once more."""
        out: list[Difference] = []
        keys = {d.key for d in diffs if d.sink == "olap" and d.key is not None}
        if keys:
            found = table_rows(self._olap(keys), self.columns)
            out += compare_rows(self.spec, {k: self.rows[k] for k in keys if k in self.rows}, found)
        for rollup in self.spec.rollups:
            if any(d.rollup == rollup.name for d in diffs):
                out += self._compare_rollup(rollup)
        keys = {d.key for d in diffs if d.sink == "search" and d.key is not None}
        if keys:
            out += self._search(keys)
        return out

    # --- ingestion in flight ------------------------------------------------------------

    def committed(self) -> tuple[dict[int, int], dict[int, int]]:
        """Committed offsets of the OLAP sink (catalog) and the search sink (Kafka);
        read before the sinks are re-read, so the data is at least that new."""
        log = self.log
        olap = {
            p: o
            for (t, p), o in self.reader.ingest_figures(self.spec.name).offsets.items()
            if t == log.topic
        }
        group = self.settings.group("search", self.spec.name)
        search = committed_offsets(self.settings, group, log.topic, log.partitions)
        return olap, search

    def lag(
        self, diffs: list[Difference], olap_at: dict[int, int], search_at: dict[int, int]
    ) -> tuple[list[Difference], dict[str, dict[str, Any]]]:
        """Split off what a sink still catching up (or ahead of what was read) explains."""
        ends = self.log.ends
        explained: dict[str, list[Difference]] = {"olap": [], "search": [], "rollup": []}
        kept: list[Difference] = []
        for d in diffs:
            at = olap_at if d.sink == "olap" else search_at
            if d.sink != "rollup" and _in_flight(d, self.source, ends, at):
                explained[d.sink].append(d)
            else:
                kept.append(d)
        lagging_keys = {d.key for d in explained["olap"] if d.key is not None}
        touched = self._groups_of(lagging_keys) if lagging_keys else set()
        rollups = [d for d in kept if d.sink == "rollup" and (d.rollup, d.group) in touched]
        kept = [d for d in kept if d not in rollups]
        report: dict[str, dict[str, Any]] = {}
        for sink, at in (("olap", olap_at), ("search", search_at)):
            behind = {str(p): end - at.get(p, 0) for p, end in ends.items() if at.get(p, 0) < end}
            if behind or explained[sink]:
                report[sink] = {"behind": behind, "keys": len(explained[sink])}
        if rollups:
            report["rollup"] = {"groups": len(rollups)}
        return kept, report

    def _groups_of(self, keys: set[str]) -> set[tuple[str, Any]]:
        """(rollup, group) pairs the expected and the stored rows of ``keys`` fall in."""
        expected = self.log.rows.filter(
            pc.is_in(self.log.rows.column(self.spec.datasource.key), pa.array(sorted(keys)))
        )
        stored = self._olap(keys)
        out: set[tuple[str, Any]] = set()
        for rollup in self.spec.rollups:
            columns = ["bucket", *rollup.dimensions]
            for table in (expected, stored):
                for group in self._expected_groups(rollup, table):
                    out.add((rollup.name, tuple(zip(columns, group, strict=True))))
        return out

    # --- repair ---------------------------------------------------------------------------

    def repair(self, diffs: list[Difference]) -> tuple[dict[tuple[Any, ...], str], list[str]]:
        """Fix ``diffs`` in stages; return what was done per difference (the caller
        re-reads to confirm) and notes on what could not be done."""
        from compaction.repair import repair_olap, repair_search

        done: dict[tuple[Any, ...], str] = {}
        notes: list[str] = []
        olap = [d for d in diffs if d.sink == "olap"]
        rollup = [d for d in diffs if d.sink == "rollup"]
        if olap or rollup:
            fixed, said = repair_olap(self, olap, rollup)
            done |= fixed
            notes += said
        search = [d for d in diffs if d.sink == "search"]
        if search:
            fixed, said = repair_search(self, search)
            done |= fixed
            notes += said
        return done, notes

    def olap_rows(self, keys: Iterable[str]) -> pa.Table:
        """The merged view's current rows of ``keys``."""
        return self._olap(keys)

    def expected_table(self, keys: Iterable[str]) -> pa.Table:
        """Expected rows of ``keys`` in the base columns, with their source columns."""
        rows = self.log.rows
        return rows.filter(
            pc.is_in(rows.column(self.spec.datasource.key), pa.array(sorted(keys), pa.string()))
        )

    def docs(self, keys: Iterable[str]) -> dict[int, list[Doc]]:
        """Search documents of ``keys`` as ingestion builds them, per source partition."""
        ds = self.spec.datasource
        names = self.columns
        out: dict[int, list[Doc]] = {}
        for key in keys:
            row = self.rows[key]
            value = dict(zip(names, row, strict=True))
            out.setdefault(self.source[key][0], []).append(
                Doc(
                    key=key,
                    tenant=value[ds.tenant],
                    time=value[ds.time],
                    version=value[ds.version],
                    event_id=value[ds.event_id],
                    text={f: value[f] for f in ds.searchable},
                )
            )
        return out


def _in_flight(
    d: Difference,
    source: Mapping[str, tuple[int, int]],
    ends: Mapping[int, int],
    committed: Mapping[int, int],
) -> bool:
    """Whether the sink's committed position explains ``d``: it has not consumed the
    key's latest event yet, or it consumed past where the log was read."""
    where = source.get(d.key) if d.key is not None else None
    if d.kind in ("missing", "stale") and where is not None:
        return committed.get(where[0], 0) <= where[1]
    if d.kind == "unexpected":
        parts = [where[0]] if where is not None else list(committed)
        return any(committed.get(p, 0) > ends.get(p, 0) for p in parts)
    return False


def _groups(spec: DatasourceSpec, rollup: Rollup, table: pa.Table) -> dict[Group, tuple[int, ...]]:
    columns = ["bucket", *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    keys = table_rows(table, columns)
    values = table_rows(table, metrics)
    return {k: v for k, v in zip(keys, values, strict=True) if any(v)}


def _order(d: Difference) -> tuple[Any, ...]:
    group = tuple(str(v) for _k, v in d.group or ())
    return ("olap", "rollup", "search").index(d.sink), d.rollup or "", d.kind, d.key or "", group


def _select_all(view: str) -> str:
    return exp.select(exp.Star()).from_(exp.table_(view, quoted=True)).sql(dialect=DIALECT)
