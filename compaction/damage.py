"""Damaged partitions rebuilt from the log, or the loss said exactly.

The topic is the system of record: a base partition whose file is missing or altered
is rebuilt from the latest row per key the log holds for it (decoded and selected as
ingestion does), in one catalog transaction; then its rollups are recomputed from the
restored base, and a damaged rollup partition is recomputed whole from the base.

When retention has removed the start of the log, the log may no longer hold every
row the partition held. Which keys are lost is told by the search index, fed from the
same topic: a key it holds, in that partition's time range, that the log no longer
has, is lost. Such a partition is not rebuilt unless the operator accepts the loss
(``--accept-loss``): a rebuild would pretend to be whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from compaction.logstate import LogState, read_log
from ingest.decode import Decoded
from ingest.selection import Selector
from search import SearchIndex
from storage import OlapStore
from storage.calendar import partitions_of
from storage.protocol import Damage
from tally.errors import CompactionConflict
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tally.timeutil import coarser_or_equal

log = logging.getLogger(__name__)


@dataclass
class Loss:
    """What a partition held that the log no longer has."""

    partition: str
    start: datetime
    end: datetime
    removed: dict[int, int]  # topic partition → first offset still held (before: gone)
    keys: list[str]  # keys the search index held in the range that the log lacks

    def as_dict(self) -> dict[str, Any]:
        return {
            "partition": self.partition,
            "from": self.start.isoformat(),
            "to": self.end.isoformat(),
            "offsets_removed": {str(p): [0, at] for p, at in sorted(self.removed.items())},
            "keys": self.keys,
        }


@dataclass
class Restoration:
    datasource: str
    damaged: list[Damage]
    restored: list[str] = field(default_factory=list)  # "<name>/<partition>"
    rows: int = 0
    lost: list[Loss] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # damaged partitions not restored

    def as_dict(self) -> dict[str, Any]:
        return {
            "datasource": self.datasource,
            "damaged": [
                {"datasource": d.datasource, "partition": d.partition, "reason": d.reason}
                for d in self.damaged
            ],
            "restored": self.restored,
            "rows": self.rows,
            "lost": [loss.as_dict() for loss in self.lost],
            "left": self.left,
        }


def of_spec(spec: DatasourceSpec, damage: list[Damage]) -> list[Damage]:
    names = {spec.name, *(r.name for r in spec.rollups)}
    return [d for d in damage if d.datasource in names]


def restore_damaged(
    settings: Settings,
    store: OlapStore,
    spec: DatasourceSpec,
    damage: list[Damage],
    *,
    index: SearchIndex | None,
    log_state: LogState | None = None,
    accept_loss: bool = False,
    attempts: int = 3,
) -> Restoration:
    """Restore ``spec``'s damaged partitions (base from the log, then rollups)."""
    mine = of_spec(spec, damage)
    report = Restoration(spec.name, mine)
    base = sorted({d.partition for d in mine if d.datasource == spec.name})
    done: list[str] = []
    if base:
        for attempt in range(attempts):
            state = (
                log_state if attempt == 0 and log_state is not None else read_log(settings, spec)
            )
            tables = _partition_rows(spec, state, base)
            losses = _losses(store, spec, state, base, index)
            report.lost = losses
            refused = {x.partition for x in losses} if not accept_loss else set()
            chosen = {p: t for p, t in tables.items() if p not in refused}
            if not chosen:
                break
            read_to = {
                (state.topic, p): state.ends.get(p, state.starts.get(p, 0))
                for p in state.partitions
            }
            try:
                store.restore_partitions(spec.name, chosen, read_to)
            except CompactionConflict as exc:
                log.info("%s; reading the log again", exc)
                continue
            done = sorted(chosen)
            report.rows = sum(t.num_rows for t in chosen.values())
            break
        report.restored += [f"{spec.name}/{p}" for p in done]
    rollups = sorted({(d.datasource, d.partition) for d in mine if d.datasource != spec.name})
    for name, part in rollups:
        store.restore_rollup(name, part)
        report.restored.append(f"{name}/{part}")
    _rebuild_rollups(store, spec, done)
    report.left = [f"{spec.name}/{p}" for p in base if p not in done]
    return report


def _partition_rows(spec: DatasourceSpec, state: LogState, parts: list[str]) -> dict[str, pa.Table]:
    """The latest row per key of each partition, as the OLAP sink keeps them."""
    ds = spec.datasource
    rows = state.rows.select(list(spec.columns))
    if not spec.selection("olap").everything:
        rows = Selector(spec, "olap").apply(Decoded(rows)).decoded.table.select(list(spec.columns))
    where = partitions_of(rows.column(ds.time), ds.granularity, ds.timezone)
    return {p: rows.filter(pc.equal(where, p)) for p in parts}


def _losses(
    store: OlapStore,
    spec: DatasourceSpec,
    state: LogState,
    parts: list[str],
    index: SearchIndex | None,
) -> list[Loss]:
    """Partitions the log cannot rebuild whole: retention removed offsets, and the
    search index holds keys of the partition's range the log lacks (or cannot vouch
    for them: no index, or one that does not keep every key)."""
    removed = state.removed
    if not removed:
        return []
    ds = spec.datasource
    in_log = set(state.rows.column(ds.key).to_pylist())
    whole = index is not None and spec.selection("search").everything
    found: dict[str, datetime] = {}
    if index is not None:
        missing = sorted(k for k in index.all_versions() if k not in in_log)
        found = index.locate(missing) if missing else {}
    out = []
    for part in parts:
        start, end = store.partition_range(spec.name, part)
        keys = sorted(k for k, t in found.items() if start <= t < end)
        if keys or not whole:
            out.append(Loss(part, start, end, removed, keys))
    return out


def _rebuild_rollups(store: OlapStore, spec: DatasourceSpec, parts: list[str]) -> None:
    """Rollups of restored base partitions, from the restored base: a fine rollup per
    partition, a coarser one (its buckets span partitions) whole."""
    if not parts:
        return
    ds = spec.datasource
    for rollup in spec.rollups:
        if coarser_or_equal(ds.granularity, rollup.granularity):
            for part in parts:
                store.rebuild_rollups(spec.name, part, rollup.name)
        else:
            store.rebuild_rollups(spec.name, None, rollup.name)
