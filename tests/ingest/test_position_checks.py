"""The position checks as pure functions, and the log mark Kafka's commit metadata
carries: what stops a partition, with which words, and what never does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.positions import identity_stop, out_of_range, recreated, reset_hint, summary
from storage import StoredPosition, logmark

HINT = reset_hint("payments", "olap")
ids = st.one_of(st.none(), st.text("ABCDEFabcdef0123456789+/", min_size=1, max_size=22))


def test_a_position_of_another_log_stops_its_partition_naming_both_ids_and_the_command() -> None:
    stop = identity_stop("p.v1", 3, StoredPosition(20_000, "OLD"), "NEW", HINT)
    assert stop is not None and stop.kind == "another_log" and stop.partition == 3
    assert "p.v1[3]" in stop.message and "OLD" in stop.message and "NEW" in stop.message
    assert "tally ingest reset --datasource payments --sink olap" in stop.message
    assert "\n" not in stop.message


@given(offset=st.integers(0, 10**12), stored=ids, now=ids)
def test_only_two_known_different_ids_stop_a_partition(
    offset: int, stored: str | None, now: str | None
) -> None:
    stop = identity_stop("t", 0, StoredPosition(offset, stored), now, HINT)
    assert (stop is not None) == (stored is not None and now is not None and stored != now)
    assert identity_stop("t", 0, None, now, HINT) is None  # nothing stored: the beginning


def test_a_position_before_the_log_start_is_a_loss_with_its_range() -> None:
    stop = out_of_range("t", 1, 100, 5_000, 9_000, HINT)
    assert stop.kind == "before_start"
    assert "offsets 100..4999 (4900 message(s))" in stop.message and "lost" in stop.message


def test_a_position_past_the_end_is_another_log_or_an_older_state() -> None:
    stop = out_of_range("t", 1, 20_000, 0, 512, HINT)
    assert stop.kind == "past_end" and "20000 is past the log's end 512" in stop.message
    unknown = out_of_range("t", 1, 7, None, None, HINT)
    assert unknown.kind == "past_end" and "refused position 7" in unknown.message


def test_the_report_line_names_the_first_stop_and_counts_the_rest() -> None:
    stops = [recreated("t", p, "A", "B", HINT) for p in (4, 2, 9)]
    line = summary(stops)
    assert line.startswith("t[2]:") and line.endswith("(and 2 more partition(s) stopped)")
    assert summary(stops[:1]) == stops[0].message


@given(
    offset=st.integers(0, 2**62),
    log=ids,
    reset=st.one_of(
        st.none(), st.text(min_size=1, max_size=60).filter(lambda t: ";reset=" not in t)
    ),
)
def test_a_log_mark_reads_back_as_it_was_written(
    offset: int, log: str | None, reset: str | None
) -> None:
    back = logmark.decode(offset, logmark.encode(log, reset))
    assert back == StoredPosition(offset, log, reset)


def test_metadata_of_others_and_missing_offsets_read_as_unrecorded_or_nothing() -> None:
    assert logmark.decode(5, "some other tool's note") == StoredPosition(5)
    assert logmark.decode(5, None) == StoredPosition(5)
    assert logmark.decode(-1001, "tally:log=X") is None  # nothing committed
    assert logmark.encode(None) == "" and logmark.decode(5, "") == StoredPosition(5)
