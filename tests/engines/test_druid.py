"""``tally engines`` with a real Apache Druid: the shape of the answers, SQL through the
broker, a restart on the same ports with the data kept, nothing left running after
``down``, and Kafka ingestion through the Kafka indexing service (from the classpath)."""

from __future__ import annotations

import json
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx

from engines.base import port_taken
from engines.druid import DruidEngine
from engines.process import ProcessRecord
from tests.cli import tally
from tests.druid import Druid, poll
from tests.engines.test_kafka import create_topic, produce

URL = re.compile(r"^http://127\.0\.0\.1:\d{2,5}$")
ROLES = {"zookeeper", "coordinator", "broker", "historical", "indexer"}
UP_TIMEOUT_S = 420  # a start on a loaded two-core machine, with its own 300 s deadline


def records(engine: DruidEngine) -> dict[str, ProcessRecord]:
    found = {role: engine.role_running(role) for role in engine.roles}
    assert all(rec is not None for rec in found.values()), found
    return {role: rec for role, rec in found.items() if rec is not None}


def inline_task(datasource: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A native batch task ingesting ``rows`` given inline (no file, no Kafka)."""
    return {
        "type": "index_parallel",
        "spec": {
            "dataSchema": {
                "dataSource": datasource,
                "timestampSpec": {"column": "ts", "format": "iso"},
                "dimensionsSpec": {"dimensions": ["merchant", {"type": "long", "name": "amount"}]},
                "granularitySpec": {"segmentGranularity": "day", "rollup": False},
            },
            "ioConfig": {
                "type": "index_parallel",
                "inputSource": {"type": "inline", "data": "\n".join(map(json.dumps, rows))},
                "inputFormat": {"type": "json"},
            },
            "tuningConfig": {"type": "index_parallel", "maxNumConcurrentSubTasks": 1},
        },
    }


def test_up_prints_one_json_line_with_the_urls_and_the_broker_runs_sql(druid: Druid) -> None:
    ran = tally("engines", "up", "druid", "--format", "json", data_dir=druid.data_dir)
    assert ran.code == 0, ran.err
    assert len(ran.out.splitlines()) == 1
    doc = ran.json()
    assert set(doc) == {"engines", "env"}
    info = doc["engines"]["druid"]
    running = records(druid.engine)
    # Already up: the same processes, not a second cluster.
    assert info["pid"] == running["coordinator"].pid
    assert {role: p["pid"] for role, p in info["processes"].items()} == {
        role: rec.pid for role, rec in running.items()
    }
    assert set(info["processes"]) == ROLES
    assert info["running"] is True and info["version"].startswith("33.")
    for key in ("broker_url", "coordinator_url", "overlord_url"):
        assert URL.match(info[key]), info
    assert info["broker_url"] == druid.broker_url
    assert doc["env"] == {
        "TALLY_STORE__BACKEND": "druid",
        "TALLY_DRUID__BROKER_URL": info["broker_url"],
        "TALLY_DRUID__COORDINATOR_URL": info["coordinator_url"],
        "TALLY_DRUID__OVERLORD_URL": info["overlord_url"],
    }
    got = httpx.post(
        f"{doc['env']['TALLY_DRUID__BROKER_URL']}/druid/v2/sql",
        json={"query": "SELECT 1 + 1", "resultFormat": "array"},
        timeout=30,
    )
    assert got.status_code == 200 and got.json() == [[2]]
    # The indexer is the overlord's worker (tasks run in it, no middleManager).
    workers = httpx.get(f"{info['overlord_url']}/druid/indexer/v1/workers", timeout=30).json()
    assert [w["worker"]["host"] for w in workers] == [f"127.0.0.1:{druid.engine.port('indexer')}"]


def test_status_shows_each_process_with_its_own_log(druid: Druid) -> None:
    ran = tally("engines", "status", "--format", "json", data_dir=druid.data_dir)
    assert ran.code == 0, ran.err
    info = ran.json()["engines"]["druid"]
    assert info["running"] is True
    for role, proc in info["processes"].items():
        log = Path(proc["log"])
        assert proc["running"] is True and log.is_file(), (role, proc)
        assert log.parent == druid.engine.dir
    # Druid's own lines (its logging config is found), and it listens on loopback alone.
    broker_log = Path(info["processes"]["broker"]["log"]).read_text()
    port = druid.engine.port("broker")
    assert "Started ServerConnector" in broker_log
    assert f"{{127.0.0.1:{port}}}" in broker_log and f"{{0.0.0.0:{port}}}" not in broker_log
    table = tally("engines", "status", data_dir=druid.data_dir)
    assert table.code == 0, table.err
    assert {f"druid/{role}" for role in ROLES} <= {ln.split()[0] for ln in table.out.splitlines()}


def test_down_stops_every_process_and_up_brings_the_data_back_on_the_same_ports(
    druid: Druid,
) -> None:
    datasource = f"inline_{uuid.uuid4().hex[:8]}"
    rows = [
        {"ts": f"2026-01-0{i % 3 + 1}T10:00:00Z", "merchant": f"m{i % 2}", "amount": i}
        for i in range(12)
    ]
    status = druid.wait_task(druid.submit_task(inline_task(datasource, rows)))
    assert status["status"] == "SUCCESS", status
    poll(lambda: druid.count(datasource) == len(rows) or None, 120, "rows not queryable")
    before = records(druid.engine)
    ports = dict(druid.engine.state()["ports"])

    down = tally("engines", "down", "druid", "--format", "json", data_dir=druid.data_dir)
    assert down.code == 0, down.err
    stopped = down.json()["engines"]["druid"]
    assert stopped["running"] is False and stopped["pid"] is None
    assert all(p["pid"] is None for p in stopped["processes"].values())
    assert not any(rec.alive() for rec in before.values())  # no JVM left
    assert not any(port_taken(int(port)) for port in ports.values()), ports

    up = tally(
        "engines", "up", "druid", "--format", "json", data_dir=druid.data_dir,
        timeout=UP_TIMEOUT_S,
    )  # fmt: skip
    assert up.code == 0, up.err
    info = up.json()["engines"]["druid"]
    assert info["broker_url"] == druid.broker_url
    assert druid.engine.state()["ports"] == ports
    assert not set(info["processes"][r]["pid"] for r in ROLES) & {r.pid for r in before.values()}
    assert druid.count(datasource) == len(rows)  # ready means the historical serves it
    got = druid.sql(f'SELECT merchant, SUM(amount) FROM "{datasource}" GROUP BY 1 ORDER BY 1')
    assert got == [["m0", sum(range(0, 12, 2))], ["m1", sum(range(1, 12, 2))]]


def test_a_killed_indexer_is_started_again_alone(druid: Druid) -> None:
    before = records(druid.engine)
    before["indexer"].signal(signal.SIGKILL)
    assert before["indexer"].wait_exit(30)
    status = tally("engines", "status", "--format", "json", data_dir=druid.data_dir).json()
    info = status["engines"]["druid"]
    assert info["running"] is False and info["processes"]["indexer"]["running"] is False
    assert info["pid"] == before["coordinator"].pid  # the rest runs on

    up = tally(
        "engines", "up", "druid", "--format", "json", data_dir=druid.data_dir,
        timeout=UP_TIMEOUT_S,
    )  # fmt: skip
    assert up.code == 0, up.err
    after = records(druid.engine)
    assert after["indexer"] != before["indexer"]
    assert {r: after[r] for r in ROLES - {"indexer"}} == {r: before[r] for r in ROLES - {"indexer"}}


def test_a_kafka_supervisor_ingests_what_our_kafka_holds(druid: Druid) -> None:
    """`tally engines up kafka druid` together, then Druid's own Kafka ingestion: the
    Kafka indexing service was found on the classpath (loadList is empty)."""
    ran = tally(
        "engines", "up", "kafka", "druid", "--format", "json", data_dir=druid.data_dir,
        timeout=UP_TIMEOUT_S,
    )  # fmt: skip
    assert ran.code == 0, ran.err
    doc = ran.json()
    assert set(doc["engines"]) == {"kafka", "druid"}
    assert doc["env"]["TALLY_STORE__BACKEND"] == "druid"
    bootstrap = doc["env"]["TALLY_KAFKA_BOOTSTRAP"]
    datasource = f"kafka_{uuid.uuid4().hex[:8]}"
    try:
        create_topic(bootstrap, datasource)
        values = [
            json.dumps({"ts": f"2026-02-01T00:00:{i:02d}Z", "merchant": f"m{i % 3}", "amount": i})
            for i in range(30)
        ]
        produce(bootstrap, datasource, values)
        spec = {
            "type": "kafka",
            "spec": {
                "dataSchema": {
                    "dataSource": datasource,
                    "timestampSpec": {"column": "ts", "format": "iso"},
                    "dimensionsSpec": {
                        "dimensions": ["merchant", {"type": "long", "name": "amount"}]
                    },
                    "granularitySpec": {"segmentGranularity": "day", "rollup": False},
                },
                "ioConfig": {
                    "topic": datasource,
                    "inputFormat": {"type": "json"},
                    "consumerProperties": {"bootstrap.servers": bootstrap},
                    "useEarliestOffset": True,
                    "taskCount": 1,
                    "replicas": 1,
                    "taskDuration": "PT10M",
                },
                "tuningConfig": {"type": "kafka"},
            },
        }
        sup = httpx.post(f"{druid.overlord_url}/druid/indexer/v1/supervisor", json=spec, timeout=30)
        assert sup.status_code == 200, sup.text
        assert sup.json() == {"id": datasource}
        poll(lambda: druid.count(datasource) == len(values) or None, 240, "not all ingested")
        assert druid.sql(f'SELECT SUM(amount) FROM "{datasource}"') == [[sum(range(30))]]
    finally:
        httpx.post(
            f"{druid.overlord_url}/druid/indexer/v1/supervisor/{datasource}/terminate", timeout=30
        )
        tally("engines", "down", "kafka", data_dir=druid.data_dir)
