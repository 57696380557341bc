"""End to end: generated events through the real broker and `tally ingest` (both
sinks), then a real `tally serve`; answers equal the reference computed from the
events, and a cancellation ingested after indexing shows in search results."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson

from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, with_malformed
from producers.publish import Publisher
from query_api.keys import KeyStore
from query_api.ready import wait_ready
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.factories import latest_by_key
from tests.ingest.conftest import env_for, free_port

SEOUL_OCT = datetime(2026, 9, 30, 15, tzinfo=UTC)


def _ingest(settings: Settings, sink: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tally", "ingest", "--sink", sink, "--until-idle", "3"],
        env=env_for(settings),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def _month(bucket: str, tz: Any) -> str:
    return datetime.fromisoformat(bucket).astimezone(tz).strftime("%Y-%m")


def _parse(event: dict[str, Any]) -> dict[str, Any]:
    row = dict(event)
    for name in ("approved_at", "occurred_at"):
        row[name] = datetime.fromisoformat(row[name].replace("Z", "+00:00"))
    return row


def test_through_the_broker_and_ingestion(topics: Settings, registry: SpecRegistry) -> None:
    settings = topics
    spec = registry.get("payments")
    config = GeneratorConfig(transactions=4000, merchants=3, days=20, start=SEOUL_OCT, seed=11)
    events = list(generate_events(config))
    topic = settings.topic("payments.v1")
    publisher = Publisher(settings, topic)
    publisher.send(with_malformed(iter(events), 0.01, 11))
    _ingest(settings, "all")

    latest = latest_by_key(spec, [_parse(e) for e in events])
    merchants = sorted({r["merchant_id"] for r in latest.values()})[:2]
    keys = KeyStore(settings.keys_path)
    issued = {m: keys.create(m)[1] for m in merchants}
    keys.close()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "2"],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        for m in merchants:
            client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {issued[m]}"})
            mine = [r for r in latest.values() if r["merchant_id"] == m]
            # Sales by month and status equal the recount from the events.
            resp = client.get(
                "/v1/sales",
                params={
                    "from": SEOUL_OCT.isoformat(),
                    "to": (SEOUL_OCT + timedelta(days=61)).isoformat(),
                    "granularity": "month",
                    "group_by": "status",
                },
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["source"] != "base"
            got = {
                (_month(b["bucket"], spec.tz), b["status"]): b["net_amount"]
                for b in resp.json()["buckets"]
            }
            expected: Counter[tuple[str, str]] = Counter()
            for r in mine:
                month = r["approved_at"].astimezone(spec.tz).strftime("%Y-%m")
                expected[(month, r["status"])] += r["amount"] - r["canceled_amount"]
            assert got == dict(expected)
            # Every transaction of the merchant, once, through the pages.
            seen: list[str] = []
            cursor = None
            while True:
                params: dict[str, Any] = {"limit": 200}
                if cursor:
                    params["cursor"] = cursor
                body = client.get("/v1/transactions", params=params).json()
                seen += [i["txn_id"] for i in body["items"]]
                cursor = body["next_cursor"]
                if not cursor:
                    break
            assert sorted(seen) == sorted(r["txn_id"] for r in mine)
            assert body["freshness"]["olap"] and body["freshness"]["search"]

        # A cancellation ingested into the store after the index was built: search
        # still proposes the id, the store disposes with the new status.
        m = merchants[0]
        target = next(r for r in latest.values() if r["merchant_id"] == m and r["status"] == "DONE")
        cancel = dict(
            next(
                e
                for e in events
                if e["txn_id"] == target["txn_id"] and e["version"] == target["version"]
            )
        )
        cancel |= {
            "event_id": f"{cancel['event_id']}-late-cancel",
            "event_type": "payment.canceled",
            "version": target["version"] + 1,
            "canceled_amount": target["amount"],
            "status": "CANCELED",
        }
        publisher.send([Wire(target["txn_id"].encode(), orjson.dumps(cancel), None)])
        _ingest(settings, "olap")
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {issued[m]}"})
        found = client.get("/v1/transactions", params={"q": target["order_id"]}).json()["items"]
        assert [(i["txn_id"], i["status"]) for i in found] == [(target["txn_id"], "CANCELED")]
    finally:
        server.terminate()
        server.wait(30)
