"""The operator routes (/v1/admin/*) on a real server over a store filled through the
broker: admin keys only, positions that account for every message, dead letters
newest first, compaction status and runs as the CLI sees them, and a broker that is
down reported (backends) or answered with a 503 (positions)."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest

from query_api.ready import wait_ready
from tests.ingest.conftest import env_for, free_port
from tests.query_api.conftest import Live

pytestmark = pytest.mark.slow
ROUTES = [
    ("GET", "/v1/admin/ingestion"),
    ("GET", "/v1/admin/dead-letters"),
    ("POST", "/v1/admin/dead-letters/replay"),
    ("GET", "/v1/admin/compaction"),
    ("GET", "/v1/admin/backends"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_admin_routes_need_an_admin_key(live: Live, method: str, path: str) -> None:
    with httpx.Client(base_url=live.url, timeout=30) as anon:
        resp = anon.request(method, path)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    with live.client(live.merchants()[0]) as merchant:
        resp = merchant.request(method, path)
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["message"]) == ("forbidden", "this route needs an admin key")
    assert error["request_id"] == resp.headers["X-Request-ID"]


def test_positions_account_for_every_message(live: Live) -> None:
    with live.client("admin") as c:
        body = c.get("/v1/admin/ingestion").json()
    assert body["topic"] == live.settings.topic("payments.v1")
    sinks = {s["sink"]: s for s in body["sinks"]}
    assert set(sinks) == {"olap", "search"}
    for sink in sinks.values():
        assert [p["partition"] for p in sink["partitions"]] == list(range(6))
        assert sum(p["committed"] for p in sink["partitions"]) == live.published, sink["sink"]
        assert sink["freshness"] is not None
    assert sinks["olap"]["group"] == live.settings.group("olap", "payments")


def test_dead_letters_come_newest_first_with_their_reasons(live: Live) -> None:
    with live.client("admin") as c:
        every = c.get("/v1/admin/dead-letters", params={"limit": 1000}).json()
        few = c.get("/v1/admin/dead-letters", params={"limit": 3}).json()
        bad = c.get("/v1/admin/dead-letters", params={"limit": 0})
    letters = every["dead_letters"]
    assert len(letters) == every["recorded"] == live.dead_letters >= live.malformed > 3
    assert every["unpublished"] == 0
    assert all(d["reason"] and d["sink"] == "olap" for d in letters)
    failed = [d["failed_at"] for d in letters]
    assert failed == sorted(failed, reverse=True)
    assert few["dead_letters"] == letters[:3]
    assert bad.status_code == 422 and "limit" in bad.json()["error"]["message"]


def _cli(live: Live, *args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "tally", *args, "--format", "json"],
        env=env_for(live.settings),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    parsed: dict[str, object] = json.loads(done.stdout)
    return parsed


def _times(rows: object) -> list[dict[str, object]]:
    """Rows with their times parsed (the API writes UTC as Z, the CLI as +00:00)."""
    assert isinstance(rows, list)
    return [
        {k: datetime.fromisoformat(v) if k.endswith("_at") and v else v for k, v in r.items()}
        for r in rows
    ]


def test_compaction_status_and_runs_are_the_clis(live: Live) -> None:
    ran = _cli(live, "compaction", "run")
    status = _cli(live, "compaction", "status")
    with live.client("admin") as c:
        body = c.get("/v1/admin/compaction", params={"runs": 1000}).json()
    assert _times(body["partitions"]) == _times(status["partitions"])
    compacted = ran["compacted"]
    assert isinstance(compacted, list) and compacted, "ingested batches leave days to compact"
    runs = body["runs"]
    assert sorted((r["datasource"], r["partition"]) for r in runs) == sorted(
        (r["datasource"], r["partition"]) for r in compacted
    )
    assert all(r["rows_out"] is not None and r["finished_at"] for r in runs)
    assert not any(p["due"] for p in body["partitions"])


def test_backends_report_a_broker_that_is_down_and_positions_answer_503(live: Live) -> None:
    with live.client("admin") as c:
        up = c.get("/v1/admin/backends").json()["backends"]
    assert [(b["role"], b["status"]) for b in up] == [
        ("event log", "ok"),
        ("OLAP store", "ok"),
        ("search index", "ok"),
    ]
    port = free_port()
    env = env_for(live.settings) | {"TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # librdkafka logs each refused connection
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        headers = {"Authorization": f"Bearer {live.keys['admin']}"}
        with (
            httpx.Client(base_url=url, headers=headers, timeout=60) as c,
            ThreadPoolExecutor(2) as pool,  # each waits out the broker's timeout
        ):
            asked = [
                pool.submit(c.get, path) for path in ("/v1/admin/backends", "/v1/admin/ingestion")
            ]
            down, positions = (f.result() for f in asked)
    finally:
        server.terminate()
        server.wait(30)
    assert down.status_code == 200
    log, olap, search = down.json()["backends"]
    assert log["status"] != "ok" and olap["status"] == search["status"] == "ok"
    assert positions.status_code == 503, positions.text
    assert positions.json()["error"]["code"] == "broker_unavailable"
