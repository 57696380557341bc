"""The embedded reader's session: every query runs on a cursor, and a cursor is a
DuckDB connection of its own, so settings must be global to reach it."""

from __future__ import annotations

from storage import OlapReader
from storage.embedded.reader import EmbeddedReader


def test_queries_run_in_utc_with_the_footer_cache_on(reader: OlapReader) -> None:
    assert isinstance(reader, EmbeddedReader)
    result = reader.query(
        "SELECT current_setting('TimeZone'), current_setting('parquet_metadata_cache')"
    )
    assert result.rows == [["UTC", True]]
