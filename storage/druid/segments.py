"""Druid's segments of one time chunk, as the compaction watcher reasons about them.

Druid names a segment ``<datasource>_<start>_<end>_<version>[_<partition>]`` and
serves, per time chunk, the newest version whose partition set is complete. What the
watcher needs from that, kept here as pure functions over plain listings:

* a **set** is the core partitions of one version (a compaction's output, or a batch
  task's), ``shard_spec.partitions`` of them; a set is one unit to the watcher, however
  many segments Druid cut it into (``maxRowsPerSegment``), so a large day compacted
  into three segments is not "fragmented" and never recompacted for that;
* every **appended** segment (a streaming task's, numbered beyond the core, or any
  segment of a chunk that has no core) is a unit of its own: each is one write;
* a segment still held by a streaming task (``is_realtime`` and not in the metadata
  store's used set) is **unsealed**: compaction reads published segments only, so the
  watcher asks for an early handoff first;
* a chunk is **one segment set** when every served segment is of its newest version,
  in that version's core, compacted (``last_compaction_state``) and published.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Segment:
    id: str
    datasource: str  # Druid's name
    start: datetime
    end: datetime
    version: str
    partition: int
    core: int  # the version's core partition count (0: appended, no core)
    rows: int
    bytes: int
    published: bool
    realtime: bool
    compacted: bool
    available: bool = False  # served by a historical or a task

    @property
    def in_core(self) -> bool:
        return self.partition < self.core

    @property
    def version_at(self) -> datetime | None:
        """The version's time (a lock's acquisition time); None for the epoch version
        streaming tasks append under when the chunk had no data."""
        at = instant(self.version.split("_")[0])
        return None if at is None or at.timestamp() <= 0 else at


def instant(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return None


# The columns of sys.segments the watcher reads, in this order (``from_row``).
COLUMNS = (
    "segment_id",
    "datasource",
    '"start"',
    '"end"',
    '"version"',
    "partition_num",
    "shard_spec",
    "num_rows",
    '"size"',
    "is_published",
    "is_realtime",
    "last_compaction_state",
    "is_available",
)


def from_row(row: Sequence[Any]) -> Segment:
    """One sys.segments row (``COLUMNS``)."""
    seg_id, ds, start, end, version, part, shard, rows, size, pub, rt, state, up = row
    return Segment(
        id=str(seg_id),
        datasource=str(ds),
        start=_required(start),
        end=_required(end),
        version=str(version),
        partition=int(part or 0),
        core=_core(shard),
        rows=int(rows or 0),
        bytes=int(size or 0),
        published=bool(pub),
        realtime=bool(rt),
        compacted=state is not None,
        available=bool(up),
    )


def from_metadata(body: dict[str, Any]) -> Segment:
    """One used segment as the coordinator's metadata API lists it (``?full``)."""
    interval = str(body["interval"]).split("/")
    shard = body.get("shardSpec") or {}
    return Segment(
        id=str(body["identifier"]),
        datasource=str(body["dataSource"]),
        start=_required(interval[0]),
        end=_required(interval[1]),
        version=str(body["version"]),
        partition=int(shard.get("partitionNum", 0)),
        core=int(shard.get("partitions", 0)),
        rows=0,  # the metadata store does not count rows
        bytes=int(body.get("size", 0)),
        published=True,
        realtime=False,
        compacted=body.get("lastCompactionState") is not None,
    )


def _required(text: Any) -> datetime:
    at = instant(str(text))
    if at is None:
        raise ValueError(f"not an instant: {text!r}")
    return at


def _core(shard: Any) -> int:
    spec = json.loads(shard) if isinstance(shard, str) else (shard or {})
    return int(spec.get("partitions", 0)) if isinstance(spec, dict) else 0


def visible(segments: Iterable[Segment]) -> list[Segment]:
    """The segments a query of the chunk reads: its newest version's (an older version
    still listed is overshadowed until the coordinator drops it). A streaming task
    appending under an older version counts too, until a compaction upgrades its
    pending segment: then the task announces the upgraded copy as well, and only that
    copy is counted."""
    chunk = list(segments)
    published = [s.version for s in chunk if s.published]
    newest = max(published) if published else ""
    current = [s for s in chunk if s.version >= newest]
    if any(s.realtime and not s.published for s in current):
        return current
    return current + [s for s in chunk if s.version < newest and s.realtime and not s.published]


def units(segments: Sequence[Segment]) -> list[list[Segment]]:
    """The chunk's visible segments grouped as the watcher counts them: each version's
    core set as one unit, every appended segment alone; oldest first (core sets, then
    appended segments by partition number)."""
    sets: dict[str, list[Segment]] = {}
    alone: list[Segment] = []
    for seg in visible(segments):
        if seg.in_core and seg.published:
            sets.setdefault(seg.version, []).append(seg)
        else:
            alone.append(seg)
    out = [sorted(v, key=lambda s: s.partition) for _, v in sorted(sets.items())]
    return out + [[s] for s in sorted(alone, key=lambda s: (s.version, s.partition, s.id))]


def one_set(segments: Sequence[Segment]) -> bool:
    """Whether the chunk is compacted: one unit, its core complete, compacted, sealed."""
    groups = units(segments)
    if len(groups) != 1:
        return False
    (group,) = groups
    return (
        all(s.compacted and s.published and s.in_core for s in group)
        and len(group) == group[0].core
    )


def unsealed(segments: Sequence[Segment], published_ids: Iterable[str]) -> list[Segment]:
    """Realtime segments not yet in the metadata store's used set."""
    done = set(published_ids)
    return [s for s in segments if s.realtime and s.id not in done]
