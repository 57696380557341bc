"""The query API on the Druid backend (a real ``tally serve`` over a real Druid 33):
the same routes give the answers a recount of the committed events gives, every row
is the key's merchant's, the SQL attack corpus is refused, and Druid down or stuck is
HTTP 503 with the JSON error body within the timeouts, never a 500 or a hang.

The embedded suites' own tests run here again (imported: pytest collects them in
this module, where ``api`` is the Druid-backed server), sales from the rollups among
them; those whose expectations are embedded-only (MAX over strings in SQL) have a
Druid twin here.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.druid import Druid
from tests.query_api.conftest import MERCHANTS, Api, _history, index_docs, serving
from tests.query_api.test_routes import (  # noqa: F401 (collected here, on Druid)
    SEOUL_MIDNIGHT,
    test_a_cursor_belongs_to_its_query,
    test_hybrid_search_equals_a_brute_force_scan,
    test_no_request_to_any_route_returns_another_merchants_row,
    test_one_transaction_is_only_its_merchants,
    test_pages_cover_every_row_once_newest_first,
    test_sales_equal_a_recount,
)
from tests.query_api.test_sql import (  # noqa: F401 (collected here, on Druid)
    _SHAPES,
    PAYMENT_SOURCES,
    _sql,
    test_dialects_answer_alike_and_only_for_the_key,
    test_every_attack_is_refused_with_a_4xx,
)
from tests.storage.druid.conftest import druid_settings
from tests.storage.druid.loading import load, load_rollups

pytestmark = pytest.mark.slow
SQL_TIMEOUT_S = 2.0
# Shapes Druid's planner refuses (a 400 naming why): a scalar subquery, and an outer
# join on a condition that is not an equality. Its inner joins on one are planned.
_UNPLANNABLE = re.compile(r"MAX\(|FULL OUTER JOIN .* ON [^=]*<>")
REQUEST_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def api(
    druid: Druid, tmp_path_factory: pytest.TempPathFactory, registry: SpecRegistry
) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("api-druid")
    base = Settings(data_dir=data_dir, topic_namespace=f"a{uuid.uuid4().hex[:10]}_")
    settings = druid_settings(druid, data_dir, base)
    spec = registry.get("payments")
    history = _history(600, seed=7)
    # Two tasks: versions of one key in different segments, as the supervisor leaves
    # them, the second before the first for some keys (out of order), and the second
    # redelivering every tenth event of the first (duplicates); the rollups get the
    # deltas of the same two batches.
    first, second = history[1::2], history[0::2] + history[1::2][::10]
    events = first + second
    load(druid, settings, spec, first)
    load(druid, settings, spec, second)
    load_rollups(druid, settings, spec, [first, second])
    index_docs(settings, spec, events)
    # Timeouts a loaded machine's cold Druid cannot reach: these tests are about
    # answers; the stuck-broker test serves its own with the tight ones.
    with serving(settings, spec, events, _env(druid, settings, sql_s=20, request_s=20)) as api:
        yield api


def _env(druid: Druid, settings: Settings, sql_s: float, request_s: float) -> dict[str, str]:
    return {
        "TALLY_DATA_DIR": str(settings.data_dir),
        "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
        "TALLY_STORE__BACKEND": "druid",
        "TALLY_DRUID__BROKER_URL": druid.broker_url,
        "TALLY_DRUID__OVERLORD_URL": druid.overlord_url,
        "TALLY_DRUID__REQUEST_TIMEOUT_S": str(request_s),
        "TALLY_API__SQL_TIMEOUT_S": str(sql_s),
        "TALLY_API__RATE_LIMIT": "1000000/second",
    }


def test_one_transaction_and_the_list_are_the_merged_rows(api: Api) -> None:
    latest = api.latest()
    for who in MERCHANTS:
        with api.client(who) as c:
            items = c.get("/v1/transactions", params={"limit": 1000}).json()["items"]
        mine = {k: r for k, r in latest.items() if r["merchant_id"] == who}
        assert Counter(i["txn_id"] for i in items) == Counter(list(mine))  # each key once
        for item in items:
            want = mine[item["txn_id"]]
            assert (item["version"], item["status"]) == (want["version"], want["status"])


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    who=st.sampled_from(MERCHANTS),
    # Druid has no MAX over strings: that shape is a 400 (test_sql_reads_merged_rows…).
    shape=st.sampled_from([s for s in _SHAPES if not _UNPLANNABLE.search(s)]),
    t=st.sampled_from(PAYMENT_SOURCES),
    u=st.sampled_from(PAYMENT_SOURCES),
    dialect=st.sampled_from(["mysql", "postgres", "starrocks"]),
)
def test_no_query_shape_reaches_another_merchant_on_druid(
    api: Api, who: str, shape: str, t: str, u: str, dialect: str
) -> None:
    sql = shape.format(t=t, u=u) + " LIMIT 5000"
    status, body = _sql(api, who, sql, dialect)
    assert status == 200, (sql, body)
    assert {row[0] for row in body["rows"]} <= {who, None}


def test_every_plannable_shape_is_answered_with_the_keys_rows_only(api: Api) -> None:
    """Each shape once (the property above samples them), base beside a rollup."""
    for shape in (s for s in _SHAPES if not _UNPLANNABLE.search(s)):
        sql = shape.format(t="payments", u="payments_daily") + " LIMIT 5000"
        status, body = _sql(api, "m1", sql, "mysql")
        assert status == 200, (sql, body)
        assert {row[0] for row in body["rows"]} <= {"m1", None}, sql


def test_sql_reads_merged_rows_with_the_tenant_bound(api: Api) -> None:
    status, body = _sql(
        api, "m1", "SELECT COUNT(*) AS n, COUNT(DISTINCT txn_id) AS k FROM payments"
    )
    assert status == 200, body
    mine = [r for r in api.latest().values() if r["merchant_id"] == "m1"]
    assert body["rows"] == [[len(mine), len(mine)]]
    # A rollup is its summed deltas, narrowed to the key's merchant like the base.
    status, body = _sql(
        api, "m1", "SELECT merchant_id, SUM(count) AS n FROM payments_daily GROUP BY 1"
    )
    assert status == 200, body
    assert body["rows"] == [["m1", len(mine)]]
    for shape in (s for s in _SHAPES if _UNPLANNABLE.search(s)):  # Druid's limits, not leaks
        status, body = _sql(api, "m1", shape.format(t="payments", u="payments"))
        assert status == 400 and body["error"]["code"] == "query_error", (shape, body)


def test_druid_stuck_is_a_503_within_the_timeouts(api: Api, druid: Druid) -> None:
    """The broker SIGSTOPped (it accepts connections, answers nothing): every route
    answers 503 with the JSON body within its timeout, then works again."""
    broker = druid.engine.role_running("broker")
    assert broker is not None
    tight = _env(druid, api.settings, sql_s=SQL_TIMEOUT_S, request_s=REQUEST_TIMEOUT_S)
    with serving(api.settings, api.spec, api.events, tight) as served:
        _every_route_is_a_503_while_stopped(served, broker.pid)


def _every_route_is_a_503_while_stopped(api: Api, broker_pid: int) -> None:
    mine = next(r for r in api.latest().values() if r["merchant_id"] == "m1")
    calls: list[tuple[str, str, dict[str, Any], float]] = [
        ("post", "/v1/sql", {"json": {"sql": "SELECT COUNT(*) FROM payments"}}, SQL_TIMEOUT_S),
        ("get", f"/v1/transactions/{mine['txn_id']}", {}, REQUEST_TIMEOUT_S),
        ("get", "/v1/transactions", {"params": {"limit": 5}}, REQUEST_TIMEOUT_S),
        (
            "get",
            "/v1/sales",
            {"params": {"from": "2026-10-01T00:00:00+09:00", "to": "2026-10-05T00:00:00+09:00"}},
            REQUEST_TIMEOUT_S,
        ),
    ]
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        with api.client("m1") as c:
            for method, path, kw, limit in calls:
                started = time.monotonic()
                resp = getattr(c, method)(path, **kw)
                took = time.monotonic() - started
                assert resp.status_code == 503, (path, resp.text)
                assert resp.json()["error"]["code"] == "druid_unavailable", resp.text
                assert took < limit + 1.5, (path, took)
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "not ready"
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    with api.client("m1") as c:
        assert c.get(f"/v1/transactions/{mine['txn_id']}").status_code == 200
