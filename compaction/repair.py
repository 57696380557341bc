"""Repair for ``tally verify --repair``, in stages: OLAP rows, then rollups, then search.

Rows first, because rollups are rebuilt from the merged base: once the base holds
the log's latest row per key again, ``rebuild_rollups`` over every partition a repair
touched (and every partition of a differing rollup group) makes the rollups exact.
A key that ingestion changed after verification looked at it is left alone (the
store's ``expect`` check) — the next verification sees its new state.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from compaction.check import Check
from compaction.differences import Difference, table_rows
from storage.calendar import partitions_of
from tally.timeutil import coarser_or_equal

Done = dict[tuple[Any, ...], str]


def repair_olap(
    check: Check, olap: list[Difference], rollup: list[Difference]
) -> tuple[Done, list[str]]:
    from storage import open_store

    spec = check.spec
    ds = spec.datasource
    done: Done = {}
    notes: list[str] = []
    store = open_store(check.settings, check.registry)
    try:
        partitions: set[str] = set()
        if olap:
            keys = {d.key for d in olap if d.key is not None}
            found = check.olap_rows(keys)
            expect: dict[str, tuple[int, str] | None] = dict.fromkeys(keys)
            for key, version, event_id in table_rows(found, [ds.key, ds.version, ds.event_id]):
                have = expect[key]
                expect[key] = max(have, (version, event_id)) if have else (version, event_id)
            seen = partitions_of(found.column(ds.time), ds.granularity, ds.timezone)
            rows = check.expected_table(k for k in keys if k in check.rows)
            remove = sorted(k for k in keys if k not in check.rows)
            result = store.repair(
                spec.name,
                rows.select(check.columns),
                remove,
                expect=expect,
                partitions=sorted(set(seen.to_pylist())),
            )
            partitions |= set(result.partitions)
            if result.unrepairable:
                notes.append(
                    f"olap: {len(result.unrepairable)} key(s) the {store.capabilities.name}"
                    " backend could not rewrite (their chunks were too large to reindex):"
                    f" {', '.join(result.unrepairable[:10])}"
                )
            if result.skipped:
                notes.append(
                    f"olap: {len(result.skipped)} key(s) changed since they were read, left"
                    f" alone (verify again): {', '.join(result.skipped[:10])}"
                )
            for d in olap:
                if d.key not in result.skipped and d.key not in result.unrepairable:
                    done[d.ident] = "removed" if d.key in remove else "rewrote"
        coarse = {
            r.name for r in spec.rollups if not coarser_or_equal(ds.granularity, r.granularity)
        }
        for d in rollup:
            if d.rollup in coarse or d.group is None:
                continue
            bucket = dict(d.group)["bucket"]
            times = pa.array([bucket], pa.timestamp("us", tz="UTC"))
            partitions.update(partitions_of(times, ds.granularity, ds.timezone).to_pylist())
        fine = [r.name for r in spec.rollups if r.name not in coarse]
        for part in sorted(partitions):
            for name in fine:
                store.rebuild_rollups(spec.name, part, name)
        for name in sorted(coarse):
            if partitions or any(d.rollup == name for d in rollup):
                store.rebuild_rollups(spec.name, None, name)
        for d in rollup:
            done[d.ident] = "rebuilt"
    finally:
        store.close()
    return done, notes


def repair_search(check: Check, diffs: list[Difference]) -> tuple[Done, list[str]]:
    keys = {d.key for d in diffs if d.key is not None}
    refused: dict[str, str] = {}
    for shard, docs in sorted(check.docs(k for k in keys if k in check.rows).items()):
        refused |= check.index.replace(shard, docs).refused
    remove = sorted(k for k in keys if k not in check.rows)
    if remove:
        check.index.delete(remove)
    notes = [f"search: {key} not replaced: {why}" for key, why in sorted(refused.items())[:10]]
    done = {
        d.ident: "deleted" if d.key in remove else "replaced" for d in diffs if d.key not in refused
    }
    return done, notes


def repair_all(check: Check, diffs: list[Difference]) -> tuple[Done, list[str]]:
    """Fix ``diffs`` in stages; return what was done per difference (the caller
    re-reads to confirm) and notes on what could not be done."""
    done: Done = {}
    notes: list[str] = []
    olap = [d for d in diffs if d.sink == "olap"]
    rollup = [d for d in diffs if d.sink == "rollup"]
    if olap or rollup:
        fixed, said = repair_olap(check, olap, rollup)
        done |= fixed
        notes += said
    search = [d for d in diffs if d.sink == "search"]
    if search:
        fixed, said = repair_search(check, search)
        done |= fixed
        notes += said
    return done, notes
