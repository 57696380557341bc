"""A damaged partition through the HTTP API: a real `tally serve` over a store whose
one day lost a segment file. Readiness says degraded and names it; what reads that
day is a 503 naming the partition (never a path), with a request id that is also in
the header and in the server's log line; everything else is answered as before."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import open_store
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.query_api.conftest import SPECS, Api, fill, serving

DAY = "2026-10-05"
SALES_OF_THE_DAY = {
    "from": f"{DAY}T00:00:00+09:00",
    "to": "2026-10-06T00:00:00+09:00",
    "granularity": "day",
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory, api_registry: SpecRegistry) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("damaged")
    settings = Settings(data_dir=data_dir, specs=tuple(Path(n) for n in SPECS))
    events = fill(settings, api_registry)
    env = {"TALLY_DATA_DIR": str(data_dir), "TALLY_SPECS": json.dumps(SPECS)}
    with serving(settings, api_registry.get("payments"), events, env) as api:
        store = open_store(settings, api_registry)
        try:
            lost = next(s for s in store.live_segments("payments") if s.partition == DAY)
        finally:
            store.close()
        Path(lost.path).unlink()
        yield api


def _sql(api: Api, sql: str) -> tuple[int, dict[str, object], str]:
    with api.client("m1") as c:  # (scoped to m1 by the API)
        resp = c.post("/v1/sql", json={"sql": sql})
    return resp.status_code, resp.json(), resp.headers.get("X-Request-ID", "")


def test_readiness_is_degraded_and_names_the_partition(damaged: Api) -> None:
    with damaged.client(None) as c:
        resp = c.get("/readyz")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "degraded" and body["damaged"] == [f"payments/{DAY}"], body
    with damaged.client(None) as c:
        metrics = c.get("/metrics").text
    assert (
        f'tally_store_damaged_partitions{{datasource="payments",partition="{DAY}"}} 1.0' in metrics
    )


def test_what_reads_the_day_is_a_503_naming_it_and_no_path(damaged: Api) -> None:
    status, body, rid = _sql(damaged, "SELECT count(*) AS n FROM payments")
    assert status == 503, body
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "partition_damaged"
    assert DAY in error["message"] and str(damaged.settings.data_dir) not in error["message"]
    assert ".parquet" not in error["message"] and error["request_id"] == rid != ""
    log = (damaged.settings.data_dir / "serve.log").read_text()
    assert rid in log  # the server's side: the request id and the details
    with damaged.client("admin") as c:
        resp = c.get(
            "/v1/sales",
            params={**SALES_OF_THE_DAY, "force_base": "true", "merchant": "m1"},
        )
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "partition_damaged"


def test_what_reads_other_days_is_answered(damaged: Api) -> None:
    day = [e for e in damaged.latest().values() if e["approved_at"].isoformat() >= "2026-10-09T15"]
    want = sum(
        1
        for e in day
        if e["approved_at"].isoformat() < "2026-10-10T15" and e["merchant_id"] == "m1"
    )
    status, body, _rid = _sql(
        damaged,
        "SELECT count(*) AS n FROM payments WHERE approved_at >= '2026-10-10T00:00:00+09:00'"
        " AND approved_at < '2026-10-11T00:00:00+09:00'",
    )
    assert status == 200 and body["rows"] == [[want]], body
    with damaged.client("m1") as c:  # the rollups are whole: the day is served from them
        resp = c.get(
            "/v1/sales",
            params=SALES_OF_THE_DAY,
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["source"] != "base"
