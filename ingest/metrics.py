"""Prometheus metrics for ingestion (one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LABELS = ("sink", "datasource")

consumed = Counter("tally_ingest_consumed_total", "Messages consumed", LABELS)
committed = Counter("tally_ingest_committed_total", "Messages covered by committed batches", LABELS)
rows_written = Counter(
    "tally_ingest_rows_written_total", "Rows/docs written (newer versions)", LABELS
)
stale = Counter("tally_ingest_stale_total", "Rows skipped by the version guard", LABELS)
dead_lettered = Counter(
    "tally_ingest_dead_lettered_total", "Messages sent to the dead-letter topic", LABELS
)
selected = Counter(
    "tally_ingest_selected_total",
    "Decoded events by what the sink's [sinks.<name>] selection did: kept, out_of_sample"
    " (skipped by the key's sample) or filtered (skipped by the filter)",
    (*LABELS, "outcome"),
)
rejected = Counter("tally_ingest_rejected_total", "Messages that failed validation", LABELS)
retries = Counter(
    "tally_ingest_retries_total", "Batch attempts retried after transient errors", LABELS
)
fenced = Counter(
    "tally_ingest_fenced_total", "Commits rejected because another writer moved on", LABELS
)
batch_seconds = Histogram(
    "tally_ingest_batch_seconds",
    "Time to decode and commit one micro-batch",
    LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
freshness_seconds = Gauge(
    "tally_ingest_freshness_seconds", "Now minus the newest committed event time", LABELS
)
lag = Gauge(
    "tally_ingest_lag_messages",
    "High watermark minus position per partition (the dev broker misreports watermarks)",
    (*LABELS, "partition"),
)

stopped_partitions = Gauge(
    "tally_ingest_position_stopped",
    "1 while a partition is stopped because its stored position is not of the log read"
    " (another topic incarnation, past its end, or behind its start: `tally ingest reset`)",
    (*LABELS, "partition", "reason"),
)


def serve(port: int) -> None:
    start_http_server(port, addr="127.0.0.1")
