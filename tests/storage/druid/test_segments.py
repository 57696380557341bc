"""How the watcher counts Druid's segments of a chunk (``storage.druid.segments``) and
the compaction task it submits (``storage.druid.compactor.compaction_spec``): pure, on
listings shaped as Druid 33 returned them (``sys.segments`` rows and the coordinator's
metadata API), the states seen on the real Druid by ``test_compaction.py``."""

from __future__ import annotations

from typing import Any

from storage.druid import segments as seg
from storage.druid.compactor import compaction_spec, targets
from tally.settings import Settings
from tally.specs import SpecRegistry

DS = "t.payments"
CHUNK = "2026-10-01T00:00:00.000Z"
EPOCH = "1970-01-01T00:00:00.000Z"
V2 = "2026-12-01T17:11:50.512Z"


def row(
    version: str, part: int, core: int, *, pub: bool = True, rt: bool = False, done: bool = False
) -> list[Any]:
    """A sys.segments row (``segments.COLUMNS``)."""
    suffix = f"_{part}" if part else ""
    shard = f'{{"type":"numbered","partitionNum":{part},"partitions":{core}}}'
    state = '{"partitionsSpec":{}}' if done else None
    return [
        f"{DS}_{CHUNK}_2026-10-02T00:00:00.000Z_{version}{suffix}",
        DS, CHUNK, "2026-10-02T00:00:00.000Z", version, part, shard, 10, 100,
        int(pub), int(rt), state, 1,
    ]  # fmt: skip


def chunk(*rows: list[Any]) -> list[seg.Segment]:
    return [seg.from_row(r) for r in rows]


def test_a_streamed_chunk_is_one_unit_per_appended_segment() -> None:
    history = chunk(row(EPOCH, 0, 0), row(EPOCH, 1, 0))
    assert [len(u) for u in seg.units(history)] == [1, 1]
    assert not seg.one_set(history)


def test_a_compacted_set_is_one_unit_however_many_segments() -> None:
    done = chunk(row(V2, 0, 3, done=True), row(V2, 1, 3, done=True), row(V2, 2, 3, done=True))
    assert [len(u) for u in seg.units(done)] == [3]
    assert seg.one_set(done)
    assert not seg.one_set(done[:2])  # a core partition missing: not complete


def test_an_overshadowed_version_still_listed_is_not_counted() -> None:
    listed = chunk(row(EPOCH, 0, 0), row(EPOCH, 1, 0), row(V2, 0, 1, done=True))
    assert [s.version for s in seg.visible(listed)] == [V2]
    assert seg.one_set(listed)


def test_a_late_write_after_compaction_is_an_appended_unit_and_unsealed() -> None:
    late = row(V2, 1, 1, pub=False, rt=True)
    listed = chunk(row(V2, 0, 1, done=True), late)
    assert [len(u) for u in seg.units(listed)] == [1, 1]
    assert not seg.one_set(listed)
    (pending,) = seg.unsealed(listed, published_ids=[listed[0].id])
    assert pending.partition == 1
    assert seg.unsealed(listed, published_ids=[s.id for s in listed]) == []


def test_a_task_announcing_its_upgraded_copy_counts_once() -> None:
    # Rows appended under the old version while a compaction ran: at the REPLACE
    # commit the task's pending segment is upgraded, and it announces both copies.
    listed = chunk(
        row(EPOCH, 2, 0, pub=False, rt=True),
        row(V2, 0, 1, done=True),
        row(V2, 1, 1, pub=False, rt=True),
    )
    assert [(s.version, s.partition) for s in seg.visible(listed)] == [(V2, 0), (V2, 1)]
    # Before the compaction's commit, the old version's appended segment is visible.
    before = chunk(row(EPOCH, 0, 0), row(EPOCH, 2, 0, pub=False, rt=True))
    assert len(seg.visible(before)) == 2


def test_metadata_listing_is_read_as_published() -> None:
    body = {
        "dataSource": DS,
        "interval": "2026-10-01T00:00:00.000Z/2026-10-02T00:00:00.000Z",
        "version": V2,
        "shardSpec": {"type": "numbered", "partitionNum": 0, "partitions": 1},
        "size": 4096,
        "identifier": f"{DS}_x",
        "lastCompactionState": {"partitionsSpec": {}},
    }
    s = seg.from_metadata(body)
    assert s.published and not s.realtime and s.compacted and s.in_core and s.bytes == 4096
    assert s.version_at is not None and s.version_at.isoformat().startswith("2026-12-01T17:11")
    assert seg.from_row(row(EPOCH, 0, 0)).version_at is None


def test_the_compaction_task_names_its_segments_and_keeps_the_generated_schema(
    registry: SpecRegistry,
) -> None:
    settings = Settings(topic_namespace="t.")
    found = targets(settings, registry)
    base, daily = found["payments"], found["payments_daily"]
    assert base.chunk("2026-10-01")[0].isoformat() == "2026-10-01T00:00:00+00:00"
    assert daily.key(base.chunk("2026-10-01")[0]) == "2026-10"
    task = compaction_spec(base, "tally_compact_x", ["a", "b"])
    assert task["ioConfig"]["inputSpec"] == {"type": "segments", "segments": ["a", "b"]}
    assert task["context"] == {"useConcurrentLocks": True}
    assert task["granularitySpec"] == {
        "segmentGranularity": "DAY",
        "queryGranularity": "NONE",
        "rollup": False,
    }
    assert task["dimensionsSpec"] == base.schema["dimensionsSpec"]
    rolled = compaction_spec(daily, "t2", ["c"])
    assert rolled["granularitySpec"]["rollup"] is True
    assert rolled["metricsSpec"] == daily.schema["metricsSpec"]
    assert {m["type"] for m in rolled["metricsSpec"]} == {"longSum"}  # signed deltas re-summed
