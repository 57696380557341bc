"""Failures only a real Apache Kafka can stage: the broker crashing and coming back,
and a rolling restart of the ingest processes under steady load.

The development broker (tansu) keeps its log in memory, so a killed tansu comes back
empty and nothing could be checked after it; and its group coordinator is not the
one production runs, so hand-overs between group members are only meaningful on
Kafka. These tests take ``kafka_broker`` and are skipped (or fail, under
``TALLY_TEST_ENGINES=required``) where Kafka cannot run.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from ingest.kafka import consumer_config, ensure_topics
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, with_malformed
from producers.publish import Publisher
from storage import open_store
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import Published, build
from tests.ingest.reference import published as reference_of
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow
SINKS = ("olap", "search")
PARTITIONS = 6


def _wait(
    condition: Callable[[], bool],
    what: str,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    timeout_s: float = 60,
) -> None:
    """Poll ``condition``; fail at once if an ingest process that should run exited."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc in procs:
            assert proc.poll() is None, f"ingest exited ({proc.returncode}) awaiting {what}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stored(settings: Settings, registry: SpecRegistry) -> dict[tuple[str, int], int]:
    store = open_store(settings, registry)
    try:
        return store.stored_offsets("payments")
    finally:
        store.close()


def _end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Each partition's high watermark, from Kafka (which reports it correctly)."""
    probe = Consumer(consumer_config(settings, f"{settings.topic_namespace}probe"))
    try:
        ends = {}
        for part in range(PARTITIONS):
            marks = probe.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
            assert marks is not None, f"no watermarks for {topic}[{part}]"
            ends[part] = int(marks[1])
        return ends
    finally:
        probe.close()


def _caught_up(
    settings: Settings, registry: SpecRegistry, topic: str, ends: dict[int, int]
) -> bool:
    """Both sinks are at the end of every partition: the OLAP sink by the catalog's
    offsets, the search sink by its group's committed offsets (after the index)."""
    olap = _stored(settings, registry)
    if any(olap.get((topic, p), 0) < end for p, end in ends.items()):
        return False
    probe = Consumer(consumer_config(settings, settings.group("search", "payments")))
    try:
        committed = probe.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        probe.close()
    return all((tp.offset or 0) >= ends[tp.partition or 0] for tp in committed)


def _stop(proc: subprocess.Popen[bytes], log: Path) -> list[dict[str, Any]]:
    """SIGTERM, as a supervisor stops it: it must finish cleanly and report."""
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    reports: list[dict[str, Any]] = json.loads(out)["sinks"]
    assert all(r["error"] is None for r in reports), reports
    return reports


def _totals(reports: Sequence[dict[str, Any]], sink: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in reports:
        if r["sink"] == sink:
            total.update({k: r[k] for k in ("consumed", "written", "stale", "rejected", "fenced")})
    return total


def _assert_counted_once(reports: Sequence[dict[str, Any]], published: Published) -> None:
    """The OLAP sink's own counters: every good event was written or found stale
    exactly once, every malformed one rejected exactly once — a batch processed twice
    would count twice here even where the version guard hides it from queries."""
    olap = _totals(reports, "olap")
    assert olap["written"] + olap["stale"] == len(published.good), olap
    assert olap["rejected"] == sum(published.malformed.values()), olap


def test_broker_sigkilled_mid_ingest_resumes_by_itself(
    kafka_broker: KafkaBroker, registry: SpecRegistry, data_dir: Path, tmp_path: Path
) -> None:
    """Kafka crashes (SIGKILL) under a running ingester and is started again from its
    log dirs; the same ingest process carries on, and loses or doubles nothing."""
    settings = broker_settings(kafka_broker, data_dir, partitions=PARTITIONS)
    ensure_topics(settings, registry)
    topic = settings.topic(registry.get("payments").datasource.topic)
    published = build(
        GeneratorConfig(transactions=20_000, merchants=20, days=5, seed=31, cancel_rate=0.2),
        malformed_rate=0.003,
    )
    assert published.malformed
    cut = 2 * len(published.wires) // 3
    publisher = Publisher(settings, topic)
    publisher.send(published.wires[:cut])  # acknowledged before the crash: Kafka must keep it
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--sink", "all", "--log-format", "json", log=log)
    _wait(lambda: sum(_stored(settings, registry).values()) > 0, "progress", [proc])
    at_kill = sum(_stored(settings, registry).values())

    kafka_broker.kill()
    down = time.monotonic()
    kafka_broker.restart()
    outage_s = time.monotonic() - down
    assert proc.poll() is None, "ingest must ride out a broker outage, not exit"

    publisher.send(published.wires[cut:])
    ends = _end_offsets(settings, topic)
    assert sum(ends.values()) == len(published.wires), "Kafka lost acknowledged messages"
    _wait(
        lambda: _caught_up(settings, registry, topic, ends),
        "the same ingest process to catch up after the restart",
        [proc],
        timeout_s=120,
    )
    reports = _stop(proc, log)
    print(
        f"killed Kafka at {at_kill}/{cut} messages stored; restarted in {outage_s:.1f}s;"
        f" {len(published.wires)} messages, {sum(published.malformed.values())} dead letters"
    )
    _assert_counted_once(reports, published)
    assert_exact(settings, registry, published)  # includes: each dead letter once


# --- the rolling restart ------------------------------------------------------------------

RATE = 2_000  # events per second, for the whole test
OWNERSHIP = re.compile(r"^(olap|search)/payments (assigned|revoked) \[([0-9, ]*)\]$")


@dataclass(frozen=True)
class Change:
    at: datetime
    run: str  # which process run ("a1", "b2", ...)
    sink: str
    owned: bool  # assigned (True) or let go (False)
    partitions: frozenset[int]


def _changes(run: str, log: Path) -> list[Change]:
    """Assignments and revocations from one run's JSON log lines."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if not line.startswith("{"):
            continue
        doc = json.loads(line)
        m = OWNERSHIP.match(doc.get("message", ""))
        if m:
            parts = frozenset(int(p) for p in m.group(3).split(",") if p.strip())
            at = datetime.fromisoformat(doc["time"])
            out.append(Change(at, run, m.group(1), m.group(2) == "assigned", parts))
    return out


def _owned(run: str, log: Path, sink: str) -> set[int]:
    owned: set[int] = set()
    for c in _changes(run, log):
        if c.sink == sink:
            owned = owned | c.partitions if c.owned else owned - c.partitions
    return owned


@dataclass
class Gap:
    seconds: float
    sink: str
    partition: int


def _ownership(
    changes: list[Change], until: datetime
) -> tuple[Gap | None, dict[tuple[str, int], set[str]]]:
    """Replay every run's changes in time order: the longest interval in which a
    (sink, partition) had no owner after it first had one, and the owners at ``until``.
    A partition never has two owners at once (a hand-over is revoke, then assign)."""
    owners: dict[tuple[str, int], set[str]] = {
        (s, p): set() for s in SINKS for p in range(PARTITIONS)
    }
    orphaned_at: dict[tuple[str, int], datetime] = {}
    longest: Gap | None = None
    # At equal timestamps let go first: one millisecond cannot order two processes.
    for c in sorted(changes, key=lambda c: (c.at, c.owned)):
        if c.at > until:
            break
        for p in c.partitions:
            who = owners[(c.sink, p)]
            if c.owned:
                assert not who - {c.run}, f"{c.sink}[{p}] owned by {who} and {c.run} at {c.at}"
                if (c.sink, p) in orphaned_at:
                    gap = (c.at - orphaned_at.pop((c.sink, p))).total_seconds()
                    if longest is None or gap > longest.seconds:
                        longest = Gap(gap, c.sink, p)
                who.add(c.run)
            else:
                who.discard(c.run)
                if not who:
                    orphaned_at[(c.sink, p)] = c.at
    return longest, owners


class Steady:
    """A producer thread at ``RATE`` events/s until told to stop; keeps what it sent."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.publisher = Publisher(settings, topic)
        self.sent: list[Wire] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="steady-producer", daemon=True)

    def _wires(self) -> Iterator[Wire]:
        config = GeneratorConfig(transactions=400_000, merchants=40, days=40, seed=41)
        for wire in with_malformed(generate_events(config), 0.002, config.seed):
            if self._stop.is_set():
                return
            self.sent.append(wire)
            yield wire

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.publisher.send(self._wires(), rate=RATE)
            self.seconds = time.monotonic() - started
        except BaseException as exc:  # reported by finish()
            self.failure = exc

    def start(self) -> None:
        self._thread.start()

    def finish(self) -> Published:
        assert self._thread.is_alive(), f"the producer stopped early: {self.failure!r}"
        self._stop.set()
        self._thread.join(150)
        assert not self._thread.is_alive() and self.failure is None, self.failure
        return reference_of(self.sent)


def test_rolling_restart_under_steady_load(
    kafka_broker: KafkaBroker,
    registry: SpecRegistry,
    data_dir: Path,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """The zero-downtime deploy: two ingest processes in one group under 2,000
    events/s, each stopped with SIGTERM and started again in turn. Nothing is lost or
    doubled; the longest time a partition went without an owner is reported."""
    settings = broker_settings(kafka_broker, data_dir, partitions=PARTITIONS)
    ensure_topics(settings, registry)
    topic = settings.topic(registry.get("payments").datasource.topic)
    started = time.monotonic()
    steady = Steady(settings, topic)
    steady.start()

    logs: dict[str, Path] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    reports: list[dict[str, Any]] = []
    exited: list[Change] = []  # a stopped run owns nothing, whatever its log last said

    def launch(run: str) -> None:
        logs[run] = tmp_path / f"{run}.log"
        procs[run] = start_ingest(settings, "--sink", "all", "--log-format", "json", log=logs[run])

    def owns_some(run: str) -> bool:
        return all(_owned(run, logs[run], sink) for sink in SINKS)

    def running() -> list[subprocess.Popen[bytes]]:
        return [p for p in procs.values() if p.returncode is None]

    launch("a1")
    launch("b1")
    _wait(
        lambda: owns_some("a1") and owns_some("b1"), "both processes to own partitions", running()
    )
    for old, new in (("a1", "a2"), ("b1", "b2")):
        reports += _stop(procs[old], logs[old])
        everything = frozenset(range(PARTITIONS))
        exited += [Change(datetime.now(UTC), old, sink, False, everything) for sink in SINKS]
        launch(new)
        _wait(functools.partial(owns_some, new), f"{new} to own partitions", running())
    rolled_s = time.monotonic() - started
    published = steady.finish()

    ends = _end_offsets(settings, topic)
    assert sum(ends.values()) == len(published.wires)
    _wait(
        lambda: _caught_up(settings, registry, topic, ends),
        "everything published to be ingested",
        running(),
        timeout_s=120,
    )
    changes = [c for run, log in logs.items() for c in _changes(run, log)] + exited
    gap, owners = _ownership(changes, until=datetime.now(UTC))
    reports += _stop(procs["a2"], logs["a2"]) + _stop(procs["b2"], logs["b2"])

    orphans = sorted(k for k, who in owners.items() if not who)
    assert not orphans, f"partitions left without an owner after the rolling restart: {orphans}"
    assert gap is not None, "no hand-over was seen in the logs"
    search = _totals(reports, "search")
    print(
        f"longest ownerless gap: {gap.seconds:.2f}s ({gap.sink}/{gap.partition});"
        f" {len(published.wires)} events at {len(published.wires) / steady.seconds:.0f}/s;"
        " both processes restarted after"
        f" {rolled_s:.1f}s;"
        f" search re-read {search['consumed'] - len(published.wires)} after hand-overs"
    )
    record_property("longest_ownerless_gap_s", round(gap.seconds, 3))
    record_property("longest_ownerless_gap_at", f"{gap.sink}/{gap.partition}")
    _assert_counted_once(reports, published)
    # Graceful hand-overs: each message read once by the OLAP sink over all four runs,
    # and no late write by a process that had let its partition go (it would be fenced).
    olap = _totals(reports, "olap")
    assert olap["fenced"] == 0 and olap["consumed"] == len(published.wires), olap
    assert_exact(settings, registry, published)
