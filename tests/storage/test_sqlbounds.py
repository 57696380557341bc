"""The time range a query reads of a table (``storage.sqlbounds``), from SQL fixture
files: ``-- range: START END`` (``*`` unbounded) or ``-- range: none`` (not read)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.sqlbounds import overlaps, read_range

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "sqlbounds").glob("*.sql"))


def _expected(text: str) -> tuple[datetime | None, datetime | None] | None:
    header = text.splitlines()[0].removeprefix("-- range:").split()
    if header == ["none"]:
        return None
    start, end = (None if v == "*" else datetime.fromisoformat(v) for v in header)
    return start, end


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_read_range(path: Path) -> None:
    text = path.read_text()
    assert read_range(text, "payments", "approved_at", "duckdb") == _expected(text)


def test_overlaps_is_half_open() -> None:
    day = datetime(2026, 11, 20, tzinfo=UTC), datetime(2026, 11, 21, tzinfo=UTC)
    assert overlaps((None, None), *day)
    assert not overlaps((day[1], None), *day)  # starts where the day ends
    assert not overlaps((None, day[0]), *day)  # ends where the day starts
    assert overlaps((day[0], day[0].replace(hour=1)), *day)
