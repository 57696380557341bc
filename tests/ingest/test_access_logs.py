"""The shipped ``access_logs`` datasource (in the spec catalog, turned on by naming it
in ``specs``) end to end, with no code of its own: logs
generated for the payment merchants, through the development broker into both sinks;
every request in OLAP, the hourly rollup equal to a recount, a 10% sample by request
id in the search index, and ``tally verify`` clean."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from ingest.kafka import ensure_topics
from ingest.service import run_ingest
from producers.access_logs import AccessLogConfig, generate_access_logs
from producers.generate import GeneratorConfig
from producers.malformed import Wire, encode
from producers.publish import Publisher
from search import open_index
from storage import open_reader
from tally.specs import SpecRegistry, spec_paths
from tally.specs.selection import in_sample
from tally.timeutil import floor
from tests.brokers import Broker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.ingest.conftest import env_for


def test_access_logs_flow_through_both_sinks_sampled_into_search(
    dev_broker: Broker, tmp_path: Path
) -> None:
    named = (Path("payments"), Path("access_logs"))  # shipped specs, turned on by name
    registry = SpecRegistry.load(spec_paths(named))
    spec = registry.get("access_logs")
    settings = broker_settings(dev_broker, tmp_path, partitions=3)
    settings = settings.model_copy(update={"specs": named})
    env = env_for(settings)  # TALLY_SPECS names both
    ensure_topics(settings, registry)
    payments = GeneratorConfig(transactions=100, merchants=8, days=3, seed=4)
    events = list(generate_access_logs(AccessLogConfig(3000, payments, seed=4)))
    wires = [Wire(e["request_id"].encode(), encode(e), None) for e in events]
    Publisher(settings, settings.topic(spec.datasource.topic)).send(wires)
    reports = run_ingest(settings, [spec], ["olap", "search"], threading.Event(), until_idle=1.0)
    assert not [r.error for r in reports if r.error]

    reader = open_reader(settings, registry)
    try:
        count = reader.query("SELECT count(*), count(DISTINCT request_id) FROM access_logs").rows
        assert count == [[len(events), len(events)]]
        stored = reader.query(
            "SELECT bucket, merchant_id, endpoint, requests, errors, latency_ms"
            " FROM access_logs_hourly"
        ).rows
    finally:
        reader.close()
    recount: dict[tuple[datetime, str, str], list[int]] = {}
    for e in events:
        at = datetime.fromisoformat(e["requested_at"])
        group = (floor(at, "hour", spec.tz), e["merchant_id"], e["endpoint"])
        sums = recount.setdefault(group, [0, 0, 0])
        sums[0] += 1
        sums[1] += e["is_error"]
        sums[2] += e["latency_ms"]
    summed: dict[tuple[datetime, str, str], list[int]] = {}
    for bucket, merchant, endpoint, *metrics in stored:  # summed over status_code
        sums = summed.setdefault((_aware(bucket), merchant, endpoint), [0, 0, 0])
        for i, value in enumerate(metrics):
            sums[i] += value
    assert summed == recount

    index = open_index(settings, spec, readonly=True)
    try:
        indexed = set(index.all_versions())
    finally:
        index.close()
    assert indexed == {e["request_id"] for e in events if in_sample(e["request_id"], 0.1)}
    assert 0.05 * len(events) < len(indexed) < 0.15 * len(events)
    ran = tally("verify", "--datasource", "access_logs", "--format", "json", env=env)
    assert ran.code == 0 and ran.json()["differences"] == [], ran.err[-2000:]
    # Without --datasource every datasource is verified, one JSON line each.
    every = tally("verify", "--format", "json", env=env)
    assert every.code == 0, every.err[-2000:]
    lines = [json.loads(line) for line in every.out.splitlines()]
    assert {r["datasource"]: r["differences"] for r in lines} == {
        "access_logs": [],
        "payments": [],
    }


def _aware(value: object) -> datetime:
    assert isinstance(value, datetime)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
