"""Filters of ``[sinks.<name>]`` (tally/specs/selection.py), from the SQL fixture files
beside this module, and the key sample's determinism."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from tally.specs.selection import compile_filter, in_sample, parse_filter

FIXTURES = Path(__file__).parent / "filters"
COLUMNS = {"status": "string", "amount": "int", "card_last4": "string"}
ROWS = pa.table(
    {
        "status": ["DONE", "CANCELED", None, "PARTIAL_CANCELED"],
        "amount": [5, 500, 50, 100],
        "card_last4": ["1234", None, "9876", "5555"],
    }
)


def _cases(name: str) -> list[tuple[str, str]]:
    out = []
    for line in (FIXTURES / name).read_text().splitlines():
        if line.strip() and not line.startswith("--"):
            text, _, expected = line.rpartition("--")
            out.append((text.strip(), expected.strip()))
    return out


@pytest.mark.parametrize(("text", "expected"), _cases("kept.sql"))
def test_a_filter_keeps_the_rows_sql_would(text: str, expected: str) -> None:
    marked = ROWS.append_column("i", pa.array(range(ROWS.num_rows)))
    kept = marked.filter(compile_filter(parse_filter(text, COLUMNS))).column("i").to_pylist()
    assert kept == [int(i) for i in expected.split()]


@pytest.mark.parametrize(("text", "expected"), _cases("refused.sql"))
def test_a_filter_outside_what_is_supported_is_refused_at_load(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_filter(text, COLUMNS)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_the_sample_is_decided_by_the_key_alone_and_shares_nest() -> None:
    keys = [f"txn_{i:06}" for i in range(20_000)]
    tenth = {k for k in keys if in_sample(k, 0.1)}
    half = {k for k in keys if in_sample(k, 0.5)}
    assert tenth <= half  # a key in a 10% sample is in every larger one
    assert tenth == {k for k in keys if in_sample(k, 0.1)}  # and always the same
    assert all(in_sample(k, 1.0) for k in keys[:100])
