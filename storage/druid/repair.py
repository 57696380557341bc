"""``tally verify --repair`` on Druid: rows the way the relay writes them, then
corrective deltas per rollup group (ADR 0006's key state kept in step).

Druid cannot overwrite a row by key, but merge on read (ADR 0005) serves the newest
version: a key Druid holds **stale** or **missing** is repaired by committing the
log's latest row as the relay would, through ``DruidStore.commit``. That one Kafka
transaction also carries the key's retraction deltas and its new key state, so the
rollups and the changelog move with the row. A row Druid holds at the log's version or
newer (corrupt, or unexpected), or a key the log never had, cannot be outranked by an
append: its time chunk is **reindexed**. Once every segment of the chunk is published
(early handoffs), a native batch task replaces the chunk under a REPLACE lock with
Druid's merged rows of it, those keys' rows replaced by the log's (or dropped). Such a
row never came through the relay, so the key state and the rollups are left as they
are (the rollup stage checks them against the repaired base anyway). A chunk of more
than ``MAX_INLINE_ROWS`` rows is not sent inline: its keys come back unrepairable.

A rollup is rebuilt against Druid's own merged base, per partition: once both
supervisors have read their topics to the end, the groups recomputed from the merged
rows are compared with the summed rollup, and each group that differs gets one
corrective delta (expected minus stored) on the rollup's deltas topic. That is the
same path as every other delta, summed by the same supervisor. Each step waits until
Druid has read what it wrote, so the verifier's re-read sees the repair.

The relay must be stopped meanwhile: it holds the key state in memory, and a repair
changes the state behind its back. Its consumer group must have no members.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from storage.deltas import BUCKET, SIGN, signed_deltas
from storage.druid import dialect
from storage.druid.compactor import DruidCompactor
from storage.druid.reader import DruidReader
from storage.druid.supervisor import datasource_name, rollup_datasource_name
from storage.protocol import RebuildReport, RepairResult
from storage.refined import RowEncoder, encode_deltas, refined_topic, rollup_topic
from storage.schema import row_schema
from storage.sql import every_row, summed
from tally.errors import StoreError, StoreUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup, SpecRegistry
from tally.timeutil import bucket_key, bucket_range


class DruidStore(Protocol):
    """What repair needs of ``storage.druid.store.DruidStore`` (which imports this)."""

    settings: Settings
    registry: SpecRegistry

    @property
    def compactor(self) -> DruidCompactor: ...

    def commit(self, datasource: str, rows: pa.Table) -> object: ...

    def produce_deltas(
        self, spec: DatasourceSpec, rollup: Rollup, deltas: Sequence[bytes]
    ) -> None: ...

    def kafka_config(self) -> dict[str, Any]: ...


CAUGHT_UP_S = 180.0
# A chunk is reindexed from an inline input: beyond this many rows that request
# would be too large, and the keys are reported unrepaired instead.
MAX_INLINE_ROWS = 200_000


def repair_rows(
    store: DruidStore,
    spec: DatasourceSpec,
    rows: pa.Table,
    remove_keys: Sequence[str],
) -> RepairResult:
    """Commit the log's rows of keys Druid holds older (or not at all); report those it
    holds at that version or newer, and ``remove_keys``, as not repairable here."""
    relay_stopped(store, spec)
    ds = spec.datasource
    reader = DruidReader(store.settings, store.registry)
    try:
        keys = rows.column(ds.key).to_pylist()
        held = _versions(reader, spec, keys)
        versions = rows.column(ds.version).to_pylist()
        event_ids = rows.column(ds.event_id).to_pylist()
        wanted = {k: (v, e) for k, v, e in zip(keys, versions, event_ids, strict=True)}
        older = [k for k in keys if held.get(k) is None or held[k] < wanted[k]]
        newer = sorted({k for k in keys if k not in older} | set(remove_keys))
        chosen = rows.filter(pc.is_in(rows.column(ds.key), pa.array(older, pa.string())))
        partitions: tuple[str, ...] = ()
        if chosen.num_rows:
            store.commit(spec.name, chosen)
            _wait(
                lambda: all(_versions(reader, spec, older).get(k) == wanted[k] for k in older),
                f"Druid does not serve the {len(older)} repaired row(s)",
            )
            times = chosen.column(ds.time).to_pylist()
            partitions = tuple(sorted({bucket_key(t, ds.granularity, spec.tz) for t in times}))
        refused = reindex(store, reader, spec, rows, newer) if newer else []
        return RepairResult(
            datasource=spec.name,
            rows_written=len(older) + len([k for k in newer if k in wanted and k not in refused]),
            keys_removed=len([k for k in remove_keys if k not in refused]),
            partitions=partitions,
            unrepairable=tuple(refused),
        )
    finally:
        reader.close()


def reindex(
    store: DruidStore,
    reader: DruidReader,
    spec: DatasourceSpec,
    rows: pa.Table,
    keys: Sequence[str],
) -> list[str]:
    """Rewrite the chunks holding ``keys`` (Druid's row of each, or the log's) with
    Druid's merged rows of the chunk, those keys' replaced by the log's ``rows`` (or
    dropped); the keys left unrepaired (a chunk too large to send inline)."""
    ds = spec.datasource
    compactor = store.compactor
    target = compactor.target(spec.name)
    wanted = pa.array(list(keys), pa.string())
    held = reader.lookup(spec.name, list(keys))
    expected = rows.filter(pc.is_in(rows.column(ds.key), wanted))
    chunks: dict[str, set[str]] = {}
    for table in (held, expected):
        for key, at in zip(
            table.column(ds.key).to_pylist(), table.column(ds.time).to_pylist(), strict=True
        ):
            chunks.setdefault(target.key(at), set()).add(key)
    schema = row_schema(spec)
    encoder = RowEncoder(spec)
    left: list[str] = []
    for partition, chunk_keys in sorted(chunks.items()):
        compactor.seal(spec.name, partition)
        start, end = target.chunk(partition)
        current = reader.arrow(
            every_row(reader.relation(spec.name, start, end)).sql(dialect=dialect.NAME)
        )
        if current.num_rows > MAX_INLINE_ROWS:
            left += sorted(chunk_keys)
            continue
        mine = pa.array(sorted(chunk_keys), pa.string())
        keep = current.select(list(spec.columns)).cast(schema)
        keep = keep.filter(pc.invert(pc.is_in(keep.column(ds.key), mine)))
        times = expected.column(ds.time)
        inside = pc.and_(
            pc.is_in(expected.column(ds.key), mine),
            pc.and_(pc.greater_equal(times, pa.scalar(start)), pc.less(times, pa.scalar(end))),
        )
        add = expected.filter(inside).select(list(spec.columns)).cast(schema)
        _keys, values = encoder.encode(pa.concat_tables([keep, add]))
        compactor.replace(spec.name, partition, values)
    return left


def rebuild_rollup(
    store: DruidStore, spec: DatasourceSpec, rollup: Rollup, partition: str | None
) -> RebuildReport:
    """Correct ``rollup`` within the base partition (None: everywhere) to what Druid's
    merged base says, one corrective delta per differing group."""
    reader = DruidReader(store.settings, store.registry)
    try:
        settings = store.settings
        caught_up(store, reader, datasource_name(settings, spec), refined_topic(settings, spec))
        deltas = rollup_topic(settings, spec, rollup)
        supervisor = rollup_datasource_name(settings, rollup)
        caught_up(store, reader, supervisor, deltas)
        start = end = None
        if partition is not None:
            start, end = bucket_range(partition, spec.datasource.granularity, spec.tz)
        expected = _expected_groups(reader, spec, rollup, start, end)
        stored = _stored_groups(reader, spec, rollup, start, end)
        metrics = [m.name for m in spec.parsed_metrics]
        fixes = []
        for group in sorted(expected.keys() | stored.keys(), key=str):
            want = expected.get(group, (0,) * len(metrics))
            got = stored.get(group, (0,) * len(metrics))
            if want != got:
                names = [BUCKET, *rollup.dimensions]
                fixes.append(
                    dict(zip(names, group, strict=True))
                    | {m: w - g for m, w, g in zip(metrics, want, got, strict=True)}
                )
        report = RebuildReport(rollup.name, partition, groups_repaired=len(fixes))
        report.differences = fixes[:5]
        if fixes:
            store.produce_deltas(
                spec, rollup, encode_deltas(spec, rollup, _table(spec, rollup, fixes))
            )
            # Summed once Druid has read them (sooner than its status says so).
            _wait(
                lambda: _stored_groups(reader, spec, rollup, start, end) == expected,
                f"Druid has not summed the corrective deltas of {rollup.name}",
            )
        return report
    finally:
        reader.close()


# --- reading -----------------------------------------------------------------------------


def _versions(
    reader: DruidReader, spec: DatasourceSpec, keys: Sequence[str]
) -> dict[str, tuple[int, str]]:
    ds = spec.datasource
    found = reader.lookup(spec.name, list(keys))
    return {
        k: (v, e)
        for k, v, e in zip(
            found.column(ds.key).to_pylist(),
            found.column(ds.version).to_pylist(),
            found.column(ds.event_id).to_pylist(),
            strict=True,
        )
    }


Group = tuple[Any, ...]


def _expected_groups(
    reader: DruidReader,
    spec: DatasourceSpec,
    rollup: Rollup,
    start: datetime | None,
    end: datetime | None,
) -> dict[Group, tuple[int, ...]]:
    rows = reader.arrow(every_row(reader.relation(spec.name, start, end)).sql(dialect=dialect.NAME))
    if not rows.num_rows:
        return {}
    signed = rows.append_column(SIGN, pa.repeat(pa.scalar(1, pa.int64()), rows.num_rows))
    return _by_group(spec, rollup, signed_deltas(spec, rollup, signed))


def _stored_groups(
    reader: DruidReader,
    spec: DatasourceSpec,
    rollup: Rollup,
    start: datetime | None,
    end: datetime | None,
) -> dict[Group, tuple[int, ...]]:
    keys = [BUCKET, *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    query = summed(reader.relation(rollup.name, start, end), keys, metrics)
    return _by_group(spec, rollup, reader.arrow(query.sql(dialect=dialect.NAME)))


def _by_group(
    spec: DatasourceSpec, rollup: Rollup, table: pa.Table
) -> dict[Group, tuple[int, ...]]:
    names = [BUCKET, *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    groups = zip(*(table.column(n).to_pylist() for n in names), strict=True)
    values = zip(*(table.column(m).to_pylist() for m in metrics), strict=True)
    out = {}
    for group, sums in zip(groups, values, strict=True):
        totals = tuple(int(v or 0) for v in sums)
        if any(totals):
            out[tuple(group)] = totals
    return out


def _table(spec: DatasourceSpec, rollup: Rollup, fixes: list[dict[str, Any]]) -> pa.Table:
    columns: dict[str, pa.Array] = {
        BUCKET: pa.array([f[BUCKET] for f in fixes], pa.timestamp("us", tz="UTC"))
    }
    for dim in rollup.dimensions:
        columns[dim] = pa.array([f[dim] for f in fixes])
    for metric in spec.parsed_metrics:
        columns[metric.name] = pa.array([f[metric.name] for f in fixes], pa.int64())
    return pa.table(columns)


# --- waiting -----------------------------------------------------------------------------


def relay_stopped(store: DruidStore, spec: DatasourceSpec) -> None:
    """StoreError unless the relay's consumer group has no members."""
    group = store.settings.group("olap", spec.name)
    admin = AdminClient(store.kafka_config())
    try:
        described = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException as exc:
        raise StoreUnavailable(f"describing the relay's group {group}: {exc}") from exc
    if described.members:
        raise StoreError(
            f"the relay ({group}) is running with {len(described.members)} member(s): stop"
            " `tally ingest --sink olap` first (it holds the key state the repair rewrites)"
        )


def caught_up(store: DruidStore, reader: DruidReader, supervisor: str, topic: str) -> None:
    """Wait until ``supervisor`` has read ``topic`` to its end as it is now."""
    ends = _ends(store, topic)

    def read_all() -> bool:
        at = reader.supervisor_offsets(supervisor)
        return all(at.get((topic, p), 0) >= end for p, end in ends.items())

    _wait(read_all, f"Druid's supervisor {supervisor} has not read {topic} to its end")


def _ends(store: DruidStore, topic: str) -> Mapping[int, int]:
    consumer = Consumer(store.kafka_config() | {"group.id": "tally.repair.ends"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise StoreError(f"topic {topic} does not exist")
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in meta.partitions
        }
    except KafkaException as exc:
        raise StoreUnavailable(f"reading the end offsets of {topic}: {exc}") from exc
    finally:
        consumer.close()


def _wait(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CAUGHT_UP_S
    while not check():
        if time.monotonic() > deadline:
            raise StoreUnavailable(f"after {CAUGHT_UP_S:g} s: {what}")
        time.sleep(0.5)
