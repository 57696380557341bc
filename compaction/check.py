"""The expected state of one datasource, re-derived from its topic, and how each
sink is compared with it (``tally verify``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from compaction.differences import (
    Difference,
    Group,
    Row,
    compare_groups,
    compare_rows,
    compare_search,
    table_rows,
)
from compaction.logstate import SOURCE_OFFSET, SOURCE_PARTITION, LogState
from ingest.decode import Decoded
from ingest.kafka import committed_offsets, end_offsets
from ingest.selection import Selector
from search import Doc, SearchIndex
from storage import OlapReader
from storage.calendar import partitions_of
from storage.deltas import SIGN, signed_deltas
from storage.sql import every_row, summed
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry
from tally.specs.selection import in_sample


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
        skip: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """``skip``: damaged partitions (name → partition → why), reported apart and
        left out of the comparison: neither expected nor read there."""
        self.settings, self.registry, self.spec, self.log = settings, registry, spec, log
        self.reader, self.index = reader, index
        ds = spec.datasource
        self.columns = list(spec.columns)
        self.skip = {name: set(parts) for name, parts in (skip or {}).items() if parts}
        # Keys whose latest row lies in a damaged base partition: not compared in OLAP.
        self.damaged_keys: set[str] = set()
        if self.skip.get(spec.name):
            where = partitions_of(log.rows.column(ds.time), ds.granularity, ds.timezone)
            bad = pa.array(sorted(self.skip[spec.name]), pa.string())
            inside = log.rows.filter(pc.is_in(where, bad)).column(ds.key).to_pylist()
            self.damaged_keys = set(inside)
        rows = table_rows(log.rows, [*self.columns, SOURCE_PARTITION, SOURCE_OFFSET])
        key = self.columns.index(ds.key)
        self.rows: dict[str, Row] = {r[key]: r[: len(self.columns)] for r in rows}
        self.source: dict[str, tuple[int, int]] = {r[key]: (r[-2], r[-1]) for r in rows}
        # What each sink was told to keep ([sinks.<name>]): the keys it must hold, and
        # those whose latest version its filter skips (an earlier one may be there).
        self.kept: dict[str, set[str]] = {}
        self.unchecked: dict[str, set[str]] = {}
        for sink in ("olap", "search"):
            self.kept[sink], self.unchecked[sink] = _selected(spec, sink, log.rows)
        olap_rows = log.rows
        if not spec.selection("olap").everything:
            wanted = pa.array(sorted(self.kept["olap"]), log.rows.schema.field(ds.key).type)
            olap_rows = log.rows.filter(pc.is_in(log.rows.column(ds.key), value_set=wanted))
        self.groups = {r.name: self._expected_groups(r, olap_rows) for r in spec.rollups}

    # --- reading the sinks --------------------------------------------------------------

    def _olap(self, keys: Iterable[str] | None = None) -> pa.Table:
        name = self.spec.name
        if keys is not None:
            healthy = None
            if self.skip.get(name):
                listed = [p for group in self.reader.partition_groups(name) for p in group]
                healthy = [p for p in listed if p not in self.skip[name]]
            return self.reader.lookup(name, sorted(keys), partitions=healthy)
        return self.reader.arrow(merged_rows(self.reader, name, skip_damaged=bool(self.skip)))

    def _expected_groups(self, rollup: Rollup, rows: pa.Table) -> dict[Group, tuple[int, ...]]:
        if not rows.num_rows:
            return {}
        signed = rows.append_column(SIGN, pa.repeat(pa.scalar(1, pa.int64()), rows.num_rows))
        return _groups(self.spec, rollup, signed_deltas(self.spec, rollup, signed))

    def _stored_groups(self, rollup: Rollup) -> dict[Group, tuple[int, ...]]:
        summed = summed_groups(self.reader, self.spec, rollup, skip_damaged=bool(self.skip))
        return _groups(self.spec, rollup, self.reader.arrow(summed))

    def _unskipped(
        self, rollup: Rollup, groups: dict[Group, tuple[int, ...]]
    ) -> dict[Group, tuple[int, ...]]:
        """``groups`` without those whose bucket lies in a damaged rollup partition."""
        bad = self.skip.get(rollup.name)
        if not bad or not groups:
            return groups
        buckets = pa.array([g[0] for g in groups], pa.timestamp("us", tz="UTC"))
        where = partitions_of(buckets, rollup.partition, self.spec.datasource.timezone)
        return {
            g: v
            for g, v, p in zip(groups, groups.values(), where.to_pylist(), strict=True)
            if p not in bad
        }

    def _search(self, keys: Iterable[str] | None = None) -> list[Difference]:
        found = self.index.all_versions()
        wanted = set(found) | set(self.rows) if keys is None else set(keys)
        wanted -= self.unchecked["search"]
        ds = self.spec.datasource
        v, e, t = (self.columns.index(c) for c in (ds.version, ds.event_id, ds.time))
        kept = self.kept["search"]
        expected = {k: (r[v], r[e], r[t]) for k, r in self.rows.items() if k in wanted & kept}
        found = {k: f for k, f in found.items() if k in wanted}
        same = [k for k, f in found.items() if k in expected and f[0] == expected[k][0]]
        located = self.index.locate(same) if same else {}
        event_ids = not self.index.capabilities.external_versions
        return compare_search(expected, found, located, event_ids=event_ids)

    # --- comparing ----------------------------------------------------------------------

    def _olap_expected(self, keys: Iterable[str] | None = None) -> dict[str, Row]:
        chosen = (set(self.rows) if keys is None else set(keys)) - self.damaged_keys
        return {k: self.rows[k] for k in chosen & self.kept["olap"] if k in self.rows}

    def _olap_found(self, table: pa.Table) -> list[Row]:
        key = self.columns.index(self.spec.datasource.key)
        skip = self.unchecked["olap"] | self.damaged_keys
        return [r for r in table_rows(table, self.columns) if r[key] not in skip]

    def compare_all(self) -> list[Difference]:
        diffs = compare_rows(self.spec, self._olap_expected(), self._olap_found(self._olap()))
        for rollup in self.spec.rollups:
            diffs += self._compare_rollup(rollup)
        return diffs + self._search()

    def _compare_rollup(self, rollup: Rollup) -> list[Difference]:
        metrics = [m.name for m in self.spec.parsed_metrics]
        columns = ["bucket", *rollup.dimensions]
        stored = self._unskipped(rollup, self._stored_groups(rollup))
        expected = self._unskipped(rollup, self.groups[rollup.name])
        return compare_groups(rollup.name, columns, metrics, expected, stored)

    def again(self, diffs: list[Difference]) -> list[Difference]:
        """Re-read what ``diffs`` are about and compare it once more."""
        out: list[Difference] = []
        keys = {d.key for d in diffs if d.sink == "olap" and d.key is not None}
        if keys:
            found = self._olap_found(self._olap(keys))
            out += compare_rows(self.spec, self._olap_expected(keys), found)
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
        read before the sinks are re-read, so the data is at least that new.

        Where the engine ingests from Kafka itself (Druid), the OLAP sink's offsets
        (the relay's) say what reached the engine's topic, not what it ingested: they
        count only once the engine has read its topics to their ends; until then
        nothing counts as ingested, and what differs is lagging, not reported."""
        log = self.log
        figures = self.reader.ingest_figures(self.spec.name).offsets
        if self.reader.capabilities.visible_on_commit:
            olap = {p: o for (t, p), o in figures.items() if t == log.topic}
        elif figures and _read_to_the_end(self.settings, figures):
            olap = committed_offsets(
                self.settings,
                self.settings.group("olap", self.spec.name),
                log.topic,
                log.partitions,
            )
        else:
            olap = {}
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


def _read_to_the_end(settings: Settings, read: Mapping[tuple[str, int], int]) -> bool:
    """Whether the engine's read positions are at its topics' ends."""
    topics: dict[str, list[int]] = {}
    for topic, partition in read:
        topics.setdefault(topic, []).append(partition)
    for topic, partitions in topics.items():
        ends = end_offsets(settings, topic, partitions)
        if any(read[(topic, p)] < end for p, end in ends.items()):
            return False
    return True


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


def by_report_order(d: Difference) -> tuple[Any, ...]:
    group = tuple(str(v) for _k, v in d.group or ())
    return ("olap", "rollup", "search").index(d.sink), d.rollup or "", d.kind, d.key or "", group


def merged_rows(reader: OlapReader, name: str, *, skip_damaged: bool = False) -> str:
    """Every merged row of a datasource, through the reader's relation (a view on the
    embedded store, merge on read on Druid)."""
    relation = reader.relation(name, skip_damaged=skip_damaged)
    return every_row(relation).sql(dialect=reader.capabilities.sql_dialect)


def summed_groups(
    reader: OlapReader, spec: DatasourceSpec, rollup: Rollup, *, skip_damaged: bool = False
) -> str:
    keys = ["bucket", *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    query = summed(reader.relation(rollup.name, skip_damaged=skip_damaged), keys, metrics)
    return query.sql(dialect=reader.capabilities.sql_dialect)


def _selected(spec: DatasourceSpec, sink: str, rows: pa.Table) -> tuple[set[str], set[str]]:
    """Of the latest rows, the keys ``sink`` keeps, and those in its sample that its
    filter skips (what it holds of them depends on earlier versions: not checked)."""
    keys = rows.column(spec.datasource.key).to_pylist()
    chosen = spec.selection(sink)
    if chosen.everything:
        return set(keys), set()
    selected = Selector(spec, sink).apply(Decoded(rows))
    kept = set(selected.decoded.table.column(spec.datasource.key).to_pylist())
    sampled = {k for k in keys if in_sample(k, chosen.sample)}
    return kept, sampled - kept
