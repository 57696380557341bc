"""/v1/ledger and a payment's settlement in its details, over a real ``tally serve``
holding two merchants' payments and their settlements (tests/query_api/conftest.py),
compared with a reference recomputed here from what was committed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pytest

from tally.timeutil import Granularity, floor, next_bucket, parse_time
from tests.factories import latest_by_key
from tests.query_api.conftest import MERCHANTS, Api

RANGES = [
    # the whole history, a window starting mid-way (a balance brought forward)
    ("2026-10-01T00:00:00+09:00", "2026-12-01T00:00:00+09:00"),
    ("2026-10-20T00:00:00+09:00", "2026-11-10T00:00:00+09:00"),
]


def _reference(
    api: Api, merchant: str, start: datetime, end: datetime, granularity: Granularity
) -> list[dict[str, Any]]:
    """The ledger from the latest version of every payment and settlement."""
    payments = [r for r in api.latest().values() if r["merchant_id"] == merchant]
    sspec = _settlements_spec(api)
    settled = [
        r
        for r in latest_by_key(sspec, api.settlements).values()
        if r["merchant_id"] == merchant and r["status"] == "PAID_OUT"
    ]
    tz = api.spec.tz
    lines: dict[tuple[datetime, str], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(("count", "gross", "canceled", "net", "fees", "vat", "settled"), 0)
    )
    for p in payments:
        if start <= p["approved_at"] < end:
            line = lines[(floor(p["approved_at"], granularity, tz), p["currency"])]
            line["count"] += 1
            line["gross"] += p["amount"]
            line["canceled"] += p["canceled_amount"]
            line["net"] += p["amount"] - p["canceled_amount"]
    for s in settled:
        if start <= s["payout_at"] < end:
            line = lines[(floor(s["payout_at"], granularity, tz), s["currency"])]
            line["fees"] += s["fee"]
            line["vat"] += s["vat"]
            line["settled"] += s["settled_amount"]
    out = []
    for (bucket, currency), line in sorted(lines.items()):
        until = min(next_bucket(bucket, granularity, tz), end)  # clipped to the range
        owed = sum(
            p["amount"] - p["canceled_amount"]
            for p in payments
            if p["currency"] == currency and p["approved_at"] < until
        )
        paid = sum(
            s["fee"] + s["vat"] + s["settled_amount"]
            for s in settled
            if s["currency"] == currency and s["payout_at"] < until
        )
        out.append({"bucket": bucket, "currency": currency, **line, "unsettled": owed - paid})
    return out


def _settlements_spec(api: Api) -> Any:
    from tally.specs import SpecRegistry, spec_paths

    return SpecRegistry.load(spec_paths(api.settings.specs)).get("settlements")


def _ledger(api: Api, who: str, **params: Any) -> tuple[int, dict[str, Any]]:
    with api.client(who) as c:
        resp = c.get("/v1/ledger", params=params)
    return resp.status_code, resp.json()


def _parsed(buckets: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**b, "bucket": parse_time(b["bucket"])} for b in buckets]


@pytest.mark.parametrize("granularity", ["day", "month"])
@pytest.mark.parametrize(("start", "end"), RANGES)
def test_the_ledger_is_exact_per_bucket_and_currency(
    api: Api, granularity: Granularity, start: str, end: str
) -> None:
    for who in MERCHANTS:
        status, body = _ledger(api, who, **{"from": start, "to": end, "granularity": granularity})
        assert status == 200, body
        want = _reference(api, who, parse_time(start), parse_time(end), granularity)
        assert want and any(b["settled"] for b in want), "the fixture has payouts"
        assert _parsed(body["buckets"]) == want
        assert body["sources"] == {"payments": "payments_daily", "settlements": "settlements_daily"}


def test_the_ledger_from_the_base_rows_equals_the_rollups(api: Api) -> None:
    span = {"from": RANGES[1][0], "to": RANGES[1][1], "merchant": "m1"}
    _, rolled = _ledger(api, "admin", **span)
    status, base = _ledger(api, "admin", **span, force_base="true")
    assert status == 200, base
    assert base["sources"] == {"payments": "base", "settlements": "base"}
    assert base["buckets"] == rolled["buckets"]


HOURLY = {"granularity": "hour"}


@pytest.mark.parametrize(
    ("params", "status", "word"),
    [
        ({"from": RANGES[0][1], "to": RANGES[0][0]}, 400, "after"),
        ({"from": RANGES[0][0], "to": RANGES[0][1], "granularity": "week"}, 422, "granularity"),
        ({"from": "2026-10-01T00:00:00", "to": RANGES[0][1]}, 400, "offset"),
        ({"from": RANGES[0][0], "to": RANGES[0][1], "force_base": "true"}, 403, "admin"),
        ({"from": "2000-01-01T00:00:00Z", "to": RANGES[0][1], **HOURLY}, 400, "buckets"),
    ],
)  # fmt: skip
def test_a_bad_ledger_request_gets_a_reason(
    api: Api, params: dict[str, str], status: int, word: str
) -> None:
    got, body = _ledger(api, "m1", **params)
    assert got == status, body
    text = str(body)
    assert word in text.lower(), body


def test_a_payments_details_carry_its_settlement_or_null(api: Api) -> None:
    sspec = _settlements_spec(api)
    latest = latest_by_key(sspec, api.settlements)
    mine = [r for r in api.latest().values() if r["merchant_id"] == "m2"]
    with_one = next(r for r in mine if r["txn_id"] in latest)
    without = next(r for r in mine if r["txn_id"] not in latest)
    with api.client("m2") as c:
        got = c.get(f"/v1/transactions/{with_one['txn_id']}").json()
        none = c.get(f"/v1/transactions/{without['txn_id']}").json()
    want = latest[with_one["txn_id"]]
    settlement = got["settlement"]
    assert settlement is not None
    assert {k: settlement[k] for k in ("version", "status", "fee", "vat", "settled_amount")} == {
        k: want[k] for k in ("version", "status", "fee", "vat", "settled_amount")
    }
    assert parse_time(settlement["payout_at"]) == want["payout_at"]
    assert none["settlement"] is None and none["txn_id"] == without["txn_id"]
