"""Prometheus metrics of the compaction watcher (``tally compaction watch
--metrics-port``): what is due, what was done, what it rewrote, and how long late
partitions stayed fragmented."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from compaction.policy import Done, Task

LABELS = ("datasource", "kind")

due = Gauge("tally_compaction_partitions_due", "Compaction tasks due at the last poll", LABELS)
compactions = Counter("tally_compaction_runs_total", "Compactions and packs done", LABELS)
rewritten = Counter(
    "tally_compaction_bytes_rewritten_total", "Bytes of segments read and rewritten", LABELS
)
conflicts = Counter(
    "tally_compaction_conflicts_total",
    "Tasks skipped because their segments changed meanwhile (planned afresh)",
)
removed = Counter("tally_compaction_files_removed_total", "Replaced or orphaned files deleted")
detect_to_done = Histogram(
    "tally_compaction_detect_to_done_seconds",
    "From a late partition's fragmentation to its compaction",
    ("datasource",),
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120),
)
detect_to_start = Histogram(
    "tally_compaction_detect_to_start_seconds",
    "From a late partition's fragmentation to the start of its compaction (task submitted)",
    ("datasource",),
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120),
)
in_flight = Gauge("tally_compaction_in_flight", "Compactions running now (engine tasks)")
damaged = Gauge(
    "tally_store_damaged_partitions",
    "1 for each partition whose stored files were found missing, truncated or altered",
    ("datasource", "partition"),
)
restored = Counter(
    "tally_store_partitions_restored_total",
    "Damaged partitions rebuilt from the log",
    ("datasource",),
)


def record_damage(found: Sequence[tuple[str, str]]) -> None:
    """Set the damaged partitions' gauge to what the last check found (and only that)."""
    damaged.clear()
    for datasource, partition in sorted(set(found)):
        damaged.labels(datasource, partition).set(1)


def record_due(tasks: Sequence[Task], datasources: Sequence[str]) -> None:
    counts = {(ds, kind): 0 for ds in datasources for kind in ("late", "tiered", "pack")}
    for task in tasks:
        counts[(task.datasource, task.kind)] = counts.get((task.datasource, task.kind), 0) + 1
    for (ds, kind), n in counts.items():
        due.labels(ds, kind).set(n)


def record_done(done: Done) -> None:
    task = done.task
    compactions.labels(task.datasource, task.kind).inc()
    if done.result is not None:
        rewritten.labels(task.datasource, task.kind).inc(done.result.bytes_in)
    lag, start = done.detect_to_done_s, done.detect_to_start_s
    if lag is not None and task.kind == "late":
        detect_to_done.labels(task.datasource).observe(lag)
    if start is not None and task.kind == "late":
        detect_to_start.labels(task.datasource).observe(start)


def serve(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")
