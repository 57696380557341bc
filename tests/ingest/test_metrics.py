"""Prometheus metrics of a running ``tally ingest``, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ingest.kafka import ensure_topics
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import with_malformed
from producers.publish import Publisher
from storage import open_store
from tally.settings import Settings, StoreSettings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.ingest.conftest import free_port, start_ingest

pytestmark = pytest.mark.slow

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int) -> Samples | None:
    """name → labels → value; None while nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample of ``name`` whose labels include ``labels`` (None if absent)."""
    found = [v for key, v in samples.get(name, {}).items() if labels.items() <= dict(key).items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for key, v in samples.get(name, {}).items() if labels.items() <= dict(key).items())


def test_ingest_serves_prometheus_metrics_while_it_works(topics: Settings, tmp_path: Path) -> None:
    settings = topics
    config = GeneratorConfig(transactions=400, merchants=10, days=3, seed=3)
    wires = list(with_malformed(generate_events(config), 0.03, config.seed))
    malformed = sum(w.malformed is not None for w in wires)
    assert malformed > 0
    good = [orjson.loads(w.value) for w in wires if w.malformed is None]
    newest_event = max(datetime.fromisoformat(e["approved_at"]) for e in good)
    Publisher(settings, settings.topic("payments.v1")).send(wires)

    port = free_port()
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--metrics-port", str(port), "--until-idle", "3", log=log)
    labels = {"datasource": "payments"}
    olap = {**labels, "sink": "olap"}
    search = {**labels, "sink": "search"}
    try:
        # Wait for an observable state: both sinks committed everything, and the
        # OLAP sink published the dead letters (that happens after the commit).
        deadline = time.monotonic() + 60
        samples: Samples | None = None
        while True:
            assert proc.poll() is None, f"ingest exited early: {log.read_text()[-2000:]}"
            samples = scrape(port)
            if (
                samples is not None
                and (value(samples, "tally_ingest_committed_total", **olap) or 0) > 0
                and value(samples, "tally_ingest_committed_total", **olap) == len(wires)
                and value(samples, "tally_ingest_committed_total", **search) == len(wires)
                and value(samples, "tally_ingest_dead_lettered_total", **olap) == malformed
                # each partition's lag gauge, set by the loop after the batch it follows
                and all(
                    len(_lags(samples, s["sink"])) == settings.ingest.partitions
                    for s in (olap, search)
                )
            ):
                break
            assert time.monotonic() < deadline, f"metrics never got there: {samples}"
            time.sleep(0.1)  # polling interval, not a timing assumption
        scraped_at = datetime.now(UTC)

        for sink in (olap, search):
            assert value(samples, "tally_ingest_consumed_total", **sink) == len(wires)
            assert value(samples, "tally_ingest_rejected_total", **sink) == malformed
            written = value(samples, "tally_ingest_rows_written_total", **sink) or 0
            stale = value(samples, "tally_ingest_stale_total", **sink) or 0
            assert written + stale == len(wires) - malformed, sink
            assert written >= config.transactions
            count = value(samples, "tally_ingest_batch_seconds_count", **sink)
            assert count is not None and count >= 1
            assert (value(samples, "tally_ingest_batch_seconds_sum", **sink) or 0) > 0
            assert value(samples, "tally_ingest_batch_seconds_bucket", **sink, le="+Inf") == count
            # Freshness: now minus the newest committed event time (approved_at here).
            fresh = value(samples, "tally_ingest_freshness_seconds", **sink)
            assert fresh is not None
            want = (scraped_at - newest_event).total_seconds()
            assert want - 120 <= fresh <= want + 1, (fresh, want)
            # Lag: one gauge per assigned partition, never negative.
            lag = {
                dict(k)["partition"]: v
                for k, v in samples.get("tally_ingest_lag_messages", {}).items()
                if dict(k)["sink"] == sink["sink"]
            }
            assert set(lag) == {str(p) for p in range(settings.ingest.partitions)}, lag
            assert all(v >= 0 for v in lag.values()), lag
        # Dead letters are the OLAP sink's alone; retries and fencing did not happen.
        assert total(samples, "tally_ingest_dead_lettered_total", **search) == 0
        assert total(samples, "tally_ingest_fenced_total") == 0

        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, log.read_text()[-3000:]
    report = {s["sink"]: s for s in orjson.loads(out)["sinks"]}
    assert {k: (s["consumed"], s["rejected"]) for k, s in report.items()} == {
        "olap": (len(wires), malformed),
        "search": (len(wires), malformed),
    }
    # The metrics endpoint goes away with the process.
    assert scrape(port) is None


def _lags(samples: Samples | None, sink: str) -> dict[int, float]:
    return {
        int(dict(k)["partition"]): v
        for k, v in (samples or {}).get("tally_ingest_lag_messages", {}).items()
        if dict(k)["sink"] == sink
    }


def _ends(settings: Settings, topic: str) -> dict[int, int]:
    """Log end per partition, asked of the broker (right on Kafka, not on tansu)."""
    from confluent_kafka import Consumer, TopicPartition

    from ingest.kafka import consumer_config

    consumer = Consumer(consumer_config(settings, f"probe-{uuid.uuid4().hex}"))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(settings.ingest.partitions)
        }
    finally:
        consumer.close()


def _until(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while not check():
        assert proc.poll() is None, f"ingest exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.1)  # polling interval, not a timing assumption


def test_lag_is_the_log_end_minus_what_each_sink_made_durable(
    kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry, tmp_path: Path
) -> None:
    """Kafka only: the development broker misreports log ends. Once both sinks caught
    up, the OLAP sink is held back by a write lock on its catalog (a transient error it
    retries) while more is published: at that quiescent point its lag must be exactly
    what arrived since, per partition, while the search sink's is zero; once the lock
    goes, both reach zero and the store holds every offset."""
    settings = broker_settings(kafka_broker, data_dir).model_copy(
        update={"store": StoreSettings(gc_grace_s=0.0, busy_timeout_s=0.2)}
    )
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    publisher = Publisher(settings, topic)
    first = GeneratorConfig(transactions=1_000, merchants=10, days=3, seed=8)
    publisher.send(with_malformed(generate_events(first), 0.0, first.seed))
    before = _ends(settings, topic)
    port = free_port()
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--metrics-port", str(port), log=log)
    lock = sqlite3.connect(settings.catalog_path, isolation_level=None, timeout=30)
    zero = dict.fromkeys(before, 0)
    try:
        for sink in ("olap", "search"):

            def caught_up(sink: str = sink) -> bool:
                return _lags(scrape(port), sink) == zero

            _until(f"{sink} caught up", caught_up, proc, log)
        lock.execute("BEGIN IMMEDIATE")
        second = GeneratorConfig(transactions=1_000, merchants=10, days=3, seed=9)
        publisher.send(with_malformed(generate_events(second), 0.0, second.seed))
        after = _ends(settings, topic)
        behind = {p: after[p] - before[p] for p in after}
        assert sum(behind.values()) >= 1_000
        _until("search caught up again", lambda: _lags(scrape(port), "search") == zero, proc, log)

        def held_back() -> bool:  # the lag is what arrived, and the sink is retrying
            samples = scrape(port) or {}
            retries = value(samples, "tally_ingest_retries_total", sink="olap") or 0
            return _lags(samples, "olap") == behind and retries > 0

        _until("olap lag is what arrived while it retries", held_back, proc, log)
        samples = scrape(port)
        assert _lags(samples, "olap") == behind  # quiescent: nothing produced, nothing stored
        assert (value(samples or {}, "tally_ingest_retries_total", sink="olap") or 0) > 0
        lock.rollback()
        _until("olap caught up again", lambda: _lags(scrape(port), "olap") == zero, proc, log)
        store = open_store(settings, registry)
        assert store.stored_offsets("payments") == {(topic, p): e for p, e in after.items()}
        store.close()
    finally:
        lock.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
