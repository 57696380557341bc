"""Stream Load's statuses as the loader handles them, on the stand-in (scripted
faults) — each test says what the stand-in cannot prove about StarRocks itself."""

from __future__ import annotations

import httpx
import pytest

from storage.starrocks import ddl
from storage.starrocks.connection import Connection
from storage.starrocks.streamload import RowsRejected, StreamLoader, classify_failure
from tally.errors import StoreError, StoreUnavailable
from tally.settings import Settings
from tests.storage.starrocks.standin import StandIn

HOURLY = "payments_hourly"


def _delta(count: int, merchant: str = "m1") -> dict[str, object]:
    return {
        "bucket": "2026-11-01 00:00:00.000000",
        "_pt": "2026-11-01 00:00:00.000000",
        "merchant_id": merchant,
        "method": "CARD",
        "status": "DONE",
        "currency": "KRW",
        "count": count,
        "gross_amount": 1000 * count,
        "canceled_amount": 0,
        "net_amount": 1000 * count,
    }


def _counts(settings: Settings) -> dict[str, int]:
    conn = Connection(settings.starrocks)
    try:
        _n, rows = conn.execute(
            f"SELECT merchant_id, SUM(`count`) FROM {ddl.table_ref(settings, HOURLY)}"
            " GROUP BY merchant_id"
        )
        return {r[0]: int(r[1]) for r in rows}
    finally:
        conn.close()


def test_the_fe_redirect_is_followed_with_the_credentials(
    sr_settings: Settings, standin: StandIn
) -> None:
    """The FE answers 307; an HTTP client following it drops Authorization on the new
    host and the BE refuses the load; the loader re-sends it. Not proven here: the
    real FE's choice of BE and its redirect headers beyond Location."""
    sr = sr_settings.starrocks
    url = f"{sr.stream_load_url}/api/{sr.database}/{HOURLY}/_stream_load"
    naive = httpx.put(
        url,
        content=b"[]",
        auth=(sr.user, sr.password.get_secret_value() if sr.password else ""),
        headers={"label": "naive", "format": "json", "strip_outer_array": "true"},
        follow_redirects=True,
    )
    assert naive.status_code == 401  # what following the redirect naively gets
    before = standin.stats.be_without_auth
    result = StreamLoader(sr).load(HOURLY, [_delta(2)], "l-redirect")
    assert (result.status, result.loaded_rows, result.replayed) == ("Success", 1, False)
    assert standin.stats.be_without_auth == before
    assert _counts(sr_settings) == {"m1": 2}


def test_a_label_loaded_again_is_refused_and_changes_nothing(
    sr_settings: Settings, standin: StandIn
) -> None:
    """A replay of a batch is "Label Already Exists", reconciled as done through
    get_load_state (VISIBLE). Not proven here: how long StarRocks keeps a label."""
    loader = StreamLoader(sr_settings.starrocks)
    loader.load(HOURLY, [_delta(3)], "l-once")
    again = loader.load(HOURLY, [_delta(3), _delta(5, "m2")], "l-once")
    assert again.status == "Label Already Exists" and again.replayed
    assert _counts(sr_settings) == {"m1": 3}


def test_a_publish_timeout_is_waited_out_and_never_loaded_again(
    sr_settings: Settings, standin: StandIn
) -> None:
    """Committed but not yet visible: the loader polls get_load_state until VISIBLE,
    so the very next read sees the rows, and sends the load once. Not proven here:
    StarRocks' publish timing."""
    standin.fail_next(HOURLY, "publish_timeout")
    result = StreamLoader(sr_settings.starrocks).load(HOURLY, [_delta(4)], "l-publish")
    assert result.status == "Publish Timeout" and not result.replayed
    assert _counts(sr_settings) == {"m1": 4}
    db = sr_settings.starrocks.database
    sent = [x for x in standin.stats.loads if x["label"] == "l-publish" and x["db"] == db]
    assert len(sent) == 1


def test_a_transient_fail_frees_the_label_for_the_retry(
    sr_settings: Settings, standin: StandIn
) -> None:
    """A Fail the docs call transient (a timeout) is StoreUnavailable, and the same
    label loads on the retry. Not proven here: StarRocks' exact messages."""
    standin.fail_next(HOURLY, "transient")
    loader = StreamLoader(sr_settings.starrocks)
    with pytest.raises(StoreUnavailable):
        loader.load(HOURLY, [_delta(1)], "l-transient")
    assert loader.load(HOURLY, [_delta(1)], "l-transient").status == "Success"
    assert _counts(sr_settings) == {"m1": 1}


def test_too_many_versions_is_retried_and_names_the_compaction_pressure(
    sr_settings: Settings, standin: StandIn
) -> None:
    """StarRocks refuses loads while a tablet has too many unmerged versions: a
    transient failure, reported as compaction pressure. Not proven here: when
    StarRocks reaches that limit (the stand-in scripts it)."""
    standin.fail_next(HOURLY, "too_many_versions")
    with pytest.raises(StoreUnavailable, match="version pressure"):
        StreamLoader(sr_settings.starrocks).load(HOURLY, [_delta(1)], "l-versions")


def test_filtered_rows_fail_the_load_with_the_error_urls_reasons(
    sr_settings: Settings, standin: StandIn
) -> None:
    """A merchant id longer than its VARCHAR(128): nothing is loaded and the reasons
    name the row. Not proven here: StarRocks' own type checks beyond lengths and
    nullability."""
    long = "m" * 200
    with pytest.raises(RowsRejected) as caught:
        StreamLoader(sr_settings.starrocks).load(HOURLY, [_delta(1), _delta(1, long)], "l-bad")
    assert caught.value.filtered == 1
    assert any(long in reason and "length" in reason for reason in caught.value.reasons)
    assert _counts(sr_settings) == {}


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("[E1008]Reached timeout=300000ms @127.0.0.1:8060", StoreUnavailable),
        ("Too many versions. tablet_id: 10086, version_count: 1001, limit: 1000", StoreUnavailable),
        ("Backend not found. Check if any backend is down or not", StoreUnavailable),
        ("unknown table, tableName=payments", StoreError),
        ("Access denied; you need (at least one of) the INSERT privilege(s)", StoreError),
    ],
)
def test_a_fail_is_retried_only_when_it_may_pass(message: str, kind: type[StoreError]) -> None:
    """Pure: the classification of a Fail's Message."""
    assert classify_failure(message) is kind
