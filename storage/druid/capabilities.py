"""What Druid does natively (read by callers instead of its class)."""

from __future__ import annotations

from storage.druid import dialect
from storage.protocol import Capabilities

CAPABILITIES = Capabilities(
    name="druid",
    # sqlglot's "druid", completed for the trees Tally builds (storage.druid.dialect).
    sql_dialect=dialect.NAME,
    # Druid's supervisor keeps its offsets in its own metadata store, with the segments
    # they produced; Tally's relay commits the group's offsets in its Kafka transactions.
    # Neither is a catalog Tally commits rows and offsets to.
    transactional_offsets=False,
    # Druid compacts by itself when told to, but late cancellations in old intervals
    # must be compacted when Tally's watcher sees them: Tally will submit compaction
    # tasks for those intervals (the next issue); until then nothing calls it.
    manual_compaction=True,
    ingests_from_kafka=True,
    # Rollups at ingestion time (metricsSpec, retraction deltas) are the next issue;
    # until then the router answers every aggregate from the merged base.
    rollup_datasources=False,
    # A Druid datasource holds every version ingested; merged rows are a subquery.
    merged_views=False,
)
