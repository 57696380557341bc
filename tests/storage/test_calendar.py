"""Vectorised calendar keys and buckets agree with the zone database for any instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from storage.calendar import buckets_of, partitions_of
from tally.timeutil import GRANULARITIES, Granularity, bucket_key, floor

ZONES = [
    "Asia/Seoul",
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Europe/London",
    "Pacific/Chatham",
]
instants = st.integers(-(10**15), 4 * 10**15).map(
    lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
)


@given(
    times=st.lists(instants, min_size=1, max_size=50),
    zone=st.sampled_from(ZONES),
    granularity=st.sampled_from(GRANULARITIES),
)
def test_vectorised_calendar_matches_scalar(
    times: list[datetime], zone: str, granularity: Granularity
) -> None:
    tz = ZoneInfo(zone)
    array = pa.array(times, pa.timestamp("us", tz="UTC"))
    assert partitions_of(array, granularity, zone).to_pylist() == [
        bucket_key(t, granularity, tz) for t in times
    ]
    assert buckets_of(array, granularity, zone).to_pylist() == [
        floor(t, granularity, tz) for t in times
    ]


def test_seoul_day_boundaries() -> None:
    times = [datetime(2026, 1, 1, 14, 59, 59, tzinfo=UTC), datetime(2026, 1, 1, 15, tzinfo=UTC)]
    array = pa.array(times, pa.timestamp("us", tz="UTC"))
    assert partitions_of(array, "day", "Asia/Seoul").to_pylist() == ["2026-01-01", "2026-01-02"]
