"""The routes against a real server: auth, tenant scoping, sales equal to a recount,
pagination that neither skips nor repeats, hybrid search equal to a brute-force scan."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from storage import open_store
from tally.specs import SpecRegistry, spec_paths
from tally.timeutil import floor
from tests.query_api.conftest import MERCHANTS, START, Api

SEOUL_MIDNIGHT = START


def _error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code and body["error"]["message"]


def test_keys_are_required_and_scoped(api: Api) -> None:
    with api.client(None) as anon:
        _error(
            anon.get(
                "/v1/sales",
                params={"from": "2026-10-01T00:00:00+09:00", "to": "2026-10-02T00:00:00+09:00"},
            ),
            401,
            "unauthorized",
        )
    with api.client("m1") as c:
        bad = c.get("/v1/transactions", headers={"Authorization": "Bearer tly_nope_nope"})
        _error(bad, 401, "unauthorized")
    with api.client("admin") as admin:
        _error(admin.get("/v1/transactions"), 403, "forbidden")


def _metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_health_and_metrics(api: Api, registry: SpecRegistry) -> None:
    with api.client(None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz").json()
        assert ready["checks"] == {"store": "ok", "search": "ok"}
    counted = (
        "tally_api_requests_total",
        frozenset({"route": "/v1/sales", "method": "GET", "status": "401"}.items()),
    )
    before = _metrics(api.url).get(counted, 0.0)
    for _ in range(6):  # a new connection each: both workers answer, a scrape sums them
        assert httpx.get(f"{api.url}/v1/sales").status_code == 401
    figures = _metrics(api.url)
    assert figures[counted] - before == 6
    store = open_store(api.settings, registry)
    rows = sum(s.rows for s in store.live_segments("payments"))
    store.close()
    assert rows >= len(api.latest())
    assert figures[("tally_store_rows", frozenset({"datasource": "payments"}.items()))] == rows
    assert (
        "tally_store_freshness_seconds",
        frozenset({"datasource": "payments"}.items()),
    ) in figures
    assert (
        "tally_search_freshness_seconds",
        frozenset({"datasource": "payments"}.items()),
    ) in figures


def test_one_transaction_is_only_its_merchants(api: Api) -> None:
    latest = api.latest()
    mine = next(r for r in latest.values() if r["merchant_id"] == "m1")
    theirs = next(r for r in latest.values() if r["merchant_id"] == "m2")
    with api.client("m1") as c:
        got = c.get(f"/v1/transactions/{mine['txn_id']}")
        assert got.status_code == 200
        body = got.json()
        assert body["status"] == mine["status"] and body["amount"] == mine["amount"]
        # Every column, and each related datasource's entity where the server has one.
        served = SpecRegistry.load(spec_paths(api.settings.specs))
        related = {r.relation.as_ for r in served.related("payments") if r.relation}
        assert set(body) == {*api.spec.columns, *related}
        _error(c.get(f"/v1/transactions/{theirs['txn_id']}"), 404, "not_found")
        _error(c.get("/v1/transactions/no-such-id"), 404, "not_found")


def _recount(
    api: Api, merchant: str, start: datetime, end: datetime, gran: str, groups: tuple[str, ...]
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    out: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in api.latest().values():
        at = row["approved_at"]
        if row["merchant_id"] != merchant or not (start <= at < end):
            continue
        acc = out[(floor(at, gran, api.spec.tz), *(row[g] for g in groups))]  # type: ignore[arg-type]
        acc[0] += 1
        acc[1] += row["amount"]
        acc[2] += row["canceled_amount"]
        acc[3] += row["amount"] - row["canceled_amount"]
    return {k: tuple(v) for k, v in out.items()}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    merchant=st.sampled_from(MERCHANTS),
    start_day=st.integers(0, 40),
    days=st.integers(1, 30),
    hour=st.sampled_from([0, 0, 5]),
    gran=st.sampled_from(["hour", "day", "month"]),
    groups=st.lists(st.sampled_from(["method", "status", "currency"]), unique=True, max_size=2),
    force_base=st.booleans(),
)
def test_sales_equal_a_recount(
    api: Api,
    merchant: str,
    start_day: int,
    days: int,
    hour: int,
    gran: str,
    groups: list[str],
    force_base: bool,
) -> None:
    start = SEOUL_MIDNIGHT + timedelta(days=start_day, hours=hour)
    end = start + timedelta(days=days)
    params = {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "granularity": gran,
        "group_by": ",".join(groups),
        "force_base": str(force_base).lower(),
    }
    # Forcing the base is admin tooling: an admin key names the merchant.
    who = "admin" if force_base else merchant
    if force_base:
        params["merchant"] = merchant
    with api.client(who) as c:
        resp = c.get("/v1/sales", params=params)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    # Every range here starts and ends on an hour, so the hourly rollup can always
    # answer exactly; only forcing the base avoids the rollups.
    assert (body["source"] == "base") == force_base
    got = {
        (datetime.fromisoformat(b["bucket"]).astimezone(UTC), *(b[g] for g in groups)): (
            b["count"],
            b["gross_amount"],
            b["canceled_amount"],
            b["net_amount"],
        )
        for b in body["buckets"]
    }
    expected = {
        (k[0].astimezone(UTC), *k[1:]): v
        for k, v in _recount(api, merchant, start, end, gran, tuple(groups)).items()
    }
    assert got == expected


def test_force_base_needs_an_admin_key(api: Api) -> None:
    params = {
        "from": "2026-10-01T00:00:00+09:00",
        "to": "2026-10-15T00:00:00+09:00",
        "granularity": "day",
        "group_by": "method",
    }
    with api.client("m1") as c:
        _error(c.get("/v1/sales", params={**params, "force_base": "true"}), 403, "forbidden")
        rollup = c.get("/v1/sales", params=params)
        assert rollup.status_code == 200, rollup.text
        assert rollup.json()["source"] != "base"
        # A merchant key reads its own merchant, whatever it names.
        _error(c.get("/v1/sales", params={**params, "merchant": "m2"}), 403, "forbidden")
        own = c.get("/v1/sales", params={**params, "merchant": "m1"})
        assert own.json() == rollup.json()
    with api.client("admin") as admin:
        base = admin.get("/v1/sales", params={**params, "force_base": "true", "merchant": "m1"})
        assert base.status_code == 200, base.text
        assert base.json()["source"] == "base"
        assert base.json()["buckets"] == rollup.json()["buckets"]
        assert base.json()["buckets"]
        routed = admin.get("/v1/sales", params={**params, "merchant": "m1"})
        assert routed.json() == rollup.json()
        # Admin keys belong to no merchant: they name one.
        _error(
            admin.get("/v1/sales", params={**params, "force_base": "true"}), 400, "invalid_argument"
        )


def test_sales_rejects_bad_requests_with_one_line(api: Api) -> None:
    with api.client("m1") as c:
        cases = [
            ({"from": "2026-10-01T00:00:00", "to": "2026-10-02T00:00:00+09:00"}, 400),
            ({"from": "2026-10-02T00:00:00+09:00", "to": "2026-10-01T00:00:00+09:00"}, 400),
            (
                {
                    "from": "2026-10-01T00:00:00+09:00",
                    "to": "2026-10-02T00:00:00+09:00",
                    "group_by": "merchant_id",
                },
                400,
            ),
            (
                {
                    "from": "2026-10-01T00:00:00+09:00",
                    "to": "2026-10-02T00:00:00+09:00",
                    "group_by": "amount",
                },
                400,
            ),
            (
                {
                    "from": "2026-10-01T00:00:00+09:00",
                    "to": "2026-10-02T00:00:00+09:00",
                    "granularity": "week",
                },
                422,
            ),
            ({"from": "yesterday", "to": "2026-10-02T00:00:00+09:00"}, 422),
            (
                {
                    "from": "0001-01-01T00:00:00+00:00",
                    "to": "9999-12-31T00:00:00+00:00",
                    "granularity": "hour",
                },
                400,
            ),
        ]
        for params, status in cases:
            resp = c.get("/v1/sales", params=params)
            assert resp.status_code == status, (params, resp.text)
            message = resp.json()["error"]["message"]
            assert "\n" not in message and "Traceback" not in message


def _all_pages(api: Api, who: str, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    with api.client(who) as c:
        for _ in range(1000):
            resp = c.get(
                "/v1/transactions", params={**params, **({"cursor": cursor} if cursor else {})}
            )
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert set(body["freshness"]) == {"olap", "search"}
            items.extend(body["items"])
            cursor = body["next_cursor"]
            if cursor is None:
                return items
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize("who", MERCHANTS)
def test_pages_cover_every_row_once_newest_first(api: Api, who: str) -> None:
    items = _all_pages(api, who, limit=37, status="CANCELED")
    expected = sorted(
        (r for r in api.latest().values() if r["merchant_id"] == who and r["status"] == "CANCELED"),
        key=lambda r: (r["approved_at"], r["txn_id"]),
        reverse=True,
    )
    assert [i["txn_id"] for i in items] == [r["txn_id"] for r in expected]
    assert all(i["merchant_id"] == who for i in items)


def test_a_cursor_belongs_to_its_query(api: Api) -> None:
    with api.client("m1") as c:
        first = c.get("/v1/transactions", params={"limit": 5}).json()
        cursor = first["next_cursor"]
        assert cursor
        _error(
            c.get("/v1/transactions", params={"limit": 5, "cursor": cursor, "method": "CARD"}),
            400,
            "invalid_argument",
        )
        _error(
            c.get("/v1/transactions", params={"cursor": "not-a-cursor"}), 400, "invalid_argument"
        )
    with api.client("m2") as other:
        _error(
            other.get("/v1/transactions", params={"limit": 5, "cursor": cursor}),
            400,
            "invalid_argument",
        )


_KEYWORDS = ["커피", "원두", "이어폰", "김민", "coffee", "Earbuds", "park", "sneak"]


@pytest.mark.parametrize(
    ("keyword", "sort", "status"),
    [
        *((k, s, None) for k in _KEYWORDS for s in ("time", "relevance")),
        # a selective filter: most candidates are rejected by the store, so the
        # index is asked again for more
        *((k, "time", "CANCELED") for k in ("커피", "coffee", "park")),
        ("박", "time", None),  # one syllable, shorter than the index's grams: the store scans
        ("K", "time", None),
    ],
)
def test_hybrid_search_equals_a_brute_force_scan(
    api: Api, keyword: str, sort: str, status: str | None
) -> None:
    needle = keyword.lower()
    for who in MERCHANTS:
        params = {"q": keyword, "limit": 25, "sort": sort, **({"status": status} if status else {})}
        items = _all_pages(api, who, **params)
        expected = sorted(
            (
                r
                for r in api.latest().values()
                if r["merchant_id"] == who
                and status in (None, r["status"])
                and any(needle in (r[f] or "").lower() for f in api.spec.datasource.searchable)
            ),
            key=lambda r: (r["approved_at"], r["txn_id"]),
            reverse=True,
        )
        ids = [i["txn_id"] for i in items]
        assert len(ids) == len(set(ids)), "a page repeated a row"
        assert set(ids) == {r["txn_id"] for r in expected}
        if sort == "time":
            assert ids == [r["txn_id"] for r in expected]
        assert expected, "the keyword should match something"


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    who=st.sampled_from(MERCHANTS),
    route=st.sampled_from(["list", "get", "sql"]),
    status=st.sampled_from([None, "DONE", "CANCELED", "PARTIAL_CANCELED"]),
    method=st.sampled_from([None, "CARD", "TRANSFER", "EASY_PAY"]),
    q=st.sampled_from([None, "커피", "Kim", "박", "tx0", "o", "order-tx00"]),
    limit=st.integers(1, 60),
    pick=st.integers(0, 10_000),
    days=st.sampled_from([None, 3, 20]),
)
def test_no_request_to_any_route_returns_another_merchants_row(
    api: Api,
    who: str,
    route: str,
    status: str | None,
    method: str | None,
    q: str | None,
    limit: int,
    pick: int,
    days: int | None,
) -> None:
    """Random requests across the row-returning routes with either key: every row that
    comes back is the key's merchant's, and another merchant's id is a plain 404."""
    latest = api.latest()
    with api.client(who) as c:
        if route == "list":
            params: dict[str, Any] = {"limit": limit}
            for name, value in (("status", status), ("method", method), ("q", q)):
                if value is not None:
                    params[name] = value
            if days is not None:
                params["from"] = SEOUL_MIDNIGHT.isoformat()
                params["to"] = (SEOUL_MIDNIGHT + timedelta(days=days)).isoformat()
            resp = c.get("/v1/transactions", params=params)
            assert resp.status_code == 200, resp.text
            merchants = {i["merchant_id"] for i in resp.json()["items"]}
        elif route == "get":
            txn = sorted(latest)[pick % len(latest)]
            resp = c.get(f"/v1/transactions/{txn}")
            owner = latest[txn]["merchant_id"]
            assert resp.status_code == (200 if owner == who else 404), resp.text
            merchants = {resp.json()["merchant_id"]} if owner == who else set()
        else:
            where = f" WHERE status = '{status}'" if status else ""
            resp = c.post(
                "/v1/sql",
                json={
                    "sql": f"SELECT DISTINCT merchant_id FROM payments{where}",
                    "dialect": "mysql",
                },
            )
            assert resp.status_code == 200, resp.text
            merchants = {row[0] for row in resp.json()["rows"]}
    assert merchants <= {who}
