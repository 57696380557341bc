"""What StarRocks does natively (read by callers instead of its class)."""

from __future__ import annotations

from storage.protocol import Capabilities
from storage.starrocks import dialect

CAPABILITIES = Capabilities(
    name="starrocks",
    # sqlglot's "starrocks", completed for the zoned trees Tally builds
    # (storage.starrocks.dialect).
    sql_dialect=dialect.NAME,
    # Offsets live in StarRocks (``tally_offsets``), loaded after the rows they cover
    # with labels derived from the batch, and fenced by their starts: the OLAP sink
    # resumes from them. No transaction spans the tables; an interrupted batch is
    # recorded and committed again with the same ranges (``resumable_commits``).
    transactional_offsets=True,
    resumable_commits=True,
    # The watcher asks for a partition's compaction (``ALTER TABLE … COMPACT``);
    # StarRocks runs it in the background, over the whole partition.
    manual_compaction=True,
    partial_compaction=False,
    # The Primary Key table is the merged view (one row per key, the newest version
    # by merge_condition): no LATEST_BY or window needed, unlike Druid.
    merged_views=True,
    # StarRocks joins natively (its cost-based optimiser plans shuffle or broadcast
    # joins of Primary Key tables).
    sql_joins=True,
    # Each rollup is an Aggregate-key table of summed retraction deltas: exact.
    rollup_datasources=True,
    # A Stream Load that answered Success (or Publish Timeout, waited out) is visible.
    visible_on_commit=True,
    # Dead letters wait in ``tally_dead_letters`` until published.
    dead_letter_outbox=True,
    # Rewriting a key whatever its version (``tally verify --repair``) is not built.
    repair=False,
)
