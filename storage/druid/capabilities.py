"""What Druid does natively (read by callers instead of its class)."""

from __future__ import annotations

from storage.druid import dialect
from storage.protocol import Capabilities

CAPABILITIES = Capabilities(
    name="druid",
    # sqlglot's "druid", completed for the trees Tally builds (storage.druid.dialect).
    sql_dialect=dialect.NAME,
    # Druid's supervisor keeps its offsets in its own metadata store, with the segments
    # they produced. Tally's offsets (the relay's, or a direct commit's) are the Kafka
    # group's, committed in the same Kafka transaction as the rows, but fenced only by
    # group generation (KIP-447): a commit's start offsets are not compared with the
    # stored ones, so a zombie without a group is not refused. Not a catalog.
    transactional_offsets=False,
    # The watcher submits Druid compaction tasks for late-written chunks within
    # seconds (``storage.druid.compactor``, ADR 0007), rather than Druid's
    # auto-compaction, which scans every 30 minutes and yields to ingestion.
    manual_compaction=True,
    compacts_in_engine=True,
    # A Druid compaction replaces a whole time chunk (its segments inputSpec must
    # name every visible segment of the interval).
    partial_compaction=False,
    ingests_from_kafka=True,
    # Each rollup is a Druid datasource summing the retraction deltas the relay
    # produces with its key state (ADR 0006): exact, so the router answers from it.
    rollup_datasources=True,
    # A Druid datasource holds every version ingested; merged rows are a subquery.
    merged_views=False,
    # Druid joins the merged relations (LATEST_BY subqueries) by materialising each
    # side after the first on the broker, up to maxSubqueryRows; a larger one is
    # refused by Druid with its reason. /v1/ledger does not join in the engine: it
    # combines the two rollups in Tally, exact and cheap on every backend.
    sql_joins=True,
    # A commit is a Kafka transaction to the refined topic; the supervisor's task
    # makes it queryable seconds later.
    visible_on_commit=False,
    # Dead letters go to their topic in the commit's Kafka transaction (as the relay's).
    dead_letter_outbox=False,
    # Rewriting a key means rewriting its segments (a reindex of its intervals): not
    # built; merge on read already hides every version but the latest.
    repair=False,
)
