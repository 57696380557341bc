"""What the embedded engine does natively (read by callers instead of its class)."""

from __future__ import annotations

from storage.protocol import Capabilities

CAPABILITIES = Capabilities(
    name="embedded",
    sql_dialect="duckdb",
    transactional_offsets=True,
    manual_compaction=True,
    packs=True,
    resident_rollups=True,
    checks_files=True,
)
