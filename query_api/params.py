"""Checks on query parameters that the type alone cannot express."""

from __future__ import annotations

from datetime import UTC, datetime

from tally.errors import InvalidArgument
from tally.timeutil import Granularity

# What every engine and index behind the API can represent (tantivy's dates end in
# 2262; calendar arithmetic in a zone needs room on both sides).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)
MAX_BUCKETS = 20_000  # buckets one aggregate answer may hold
_SECONDS = {"hour": 3600, "day": 86_400, "month": 28 * 86_400}


def time_range(start: datetime | None, end: datetime | None) -> None:
    for name, value in (("from", start), ("to", end)):
        if value is None:
            continue
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgument(
                f"{name} needs a time zone offset, e.g. 2026-11-01T00:00:00+09:00"
            )
        if not EARLIEST <= value < LATEST:
            bounds = f"[{EARLIEST:%Y-%m-%d}, {LATEST:%Y-%m-%d})"
            raise InvalidArgument(f"{name} must lie in {bounds}, got {value.isoformat()}")
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("'to' must be after 'from'")


def check_buckets(start: datetime, end: datetime, granularity: Granularity) -> None:
    """Refuse a range of more buckets than one answer should hold."""
    span = (end - start).total_seconds()
    if span > 0 and span / _SECONDS[granularity] > MAX_BUCKETS:
        raise InvalidArgument(
            f"{span / _SECONDS[granularity]:,.0f} {granularity} buckets requested; "
            f"at most {MAX_BUCKETS:,} — use a coarser granularity or a shorter range"
        )
