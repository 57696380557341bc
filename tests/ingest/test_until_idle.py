"""``tally ingest --until-idle`` exits 0 only once the whole topic is consumed, even
while a crashed member of its group still holds partitions.

A member SIGKILLed while it holds partitions keeps them until the broker evicts it, a
session timeout (its own) later. An ``--until-idle`` process in the group meanwhile
holds only the other partitions; they are soon quiet, yet the dead member's are not
consumed, and exiting then loses their rows and dead letters. Brokers differ in when
the dead member's partitions reach the newcomer, so the outcome must not depend on a
timer: every test here runs on both brokers and checks the result exactly.
"""

from __future__ import annotations

import logging
import random
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingest.kafka import base_config, consumer_config, ensure_topics, flush, producer, unread
from ingest.runner import Runner, RunReport
from ingest.service import run_ingest
from ingest.sinks import OlapSink
from producers.generate import GeneratorConfig
from producers.malformed import Wire
from producers.publish import Publisher
from storage import open_store
from tally.errors import BrokerError
from tally.settings import IngestSettings, Settings
from tally.specs import SpecRegistry
from tests.brokers import Broker
from tests.conftest import broker_settings
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import Published, build
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow
ASSIGNED = re.compile(r"olap/payments assigned \[([0-9, ]*)\]")


def _with(settings: Settings, **ingest: object) -> Settings:
    return settings.model_copy(
        update={"ingest": IngestSettings(**(settings.ingest.model_dump() | ingest))}
    )


@pytest.fixture
def small_batches(broker: Broker, data_dir: Path, registry: SpecRegistry) -> Settings:
    """Topics on ``broker``, batches small enough that a kill lands mid-run, and the
    test session timeout of 3 s: the development broker takes about half a session
    timeout per rebalance step, so a short one keeps these tests short there."""
    settings = _with(broker_settings(broker, data_dir), batch_max_rows=1000)
    ensure_topics(settings, registry)
    return settings


def _stored(settings: Settings, registry: SpecRegistry) -> dict[int, int]:
    store = open_store(settings, registry)
    try:
        return {p: end for (_t, p), end in store.stored_offsets("payments").items()}
    finally:
        store.close()


def _held(log: Path) -> set[int]:
    """Partitions a process was given (nothing is revoked from it in these tests)."""
    text = log.read_text() if log.exists() else ""
    return {int(p) for m in ASSIGNED.finditer(text) for p in m.group(1).split(",") if p.strip()}


def _wait(
    condition: Callable[[], object],
    what: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 90,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"exited while waiting for {what}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _kill_mid_run(
    settings: Settings,
    registry: SpecRegistry,
    proc: subprocess.Popen[bytes],
    log: Path,
    rng: random.Random,
) -> None:
    """SIGKILL ``proc`` at a random point soon after it stored its first batch."""
    before = sum(_stored(settings, registry).values())
    deadline = time.monotonic() + 60
    while sum(_stored(settings, registry).values()) <= before:
        assert proc.poll() is None, f"ingest exited early: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "ingest made no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))  # a random point inside the work, not a timing crutch
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def _payments(seed: int) -> Published:
    published = build(
        GeneratorConfig(transactions=20_000, merchants=30, days=6, seed=seed, cancel_rate=0.15),
        malformed_rate=0.01,
    )
    assert len(published.malformed) > 100
    return published


def test_until_idle_waits_for_the_partitions_a_killed_member_holds(
    small_batches: Settings, registry: SpecRegistry, tmp_path: Path
) -> None:
    """A member is SIGKILLed while it holds partitions and an ``--until-idle`` process
    holds the others; the rest of the topic is published at once, so every partition
    has work left. The dead member keeps its partitions until the broker evicts it, a
    session timeout later; the dead member's is longer than the idle process's own
    (members need not share settings), so a rule timed on the latter gives up first."""
    settings = small_batches
    published = _payments(seed=31)
    publisher = Publisher(settings, settings.topic(registry.get("payments").datasource.topic))
    wires = published.wires
    publisher.send(wires[: len(wires) // 10])
    logs = {"member": tmp_path / "member.log", "idle": tmp_path / "idle.log"}
    lasting = _with(settings, session_timeout_ms=2 * settings.ingest.session_timeout_ms)
    member = start_ingest(lasting, "--sink", "olap", log=logs["member"])
    _wait(lambda: _held(logs["member"]), "the member's assignment", member, logs["member"])
    # Until the kill the topic keeps growing, so the idle process is never idle yet.
    killed = threading.Event()
    feeder = threading.Thread(target=_feed, args=(publisher, wires[len(wires) // 10 :], killed))
    feeder.start()
    try:
        idle = start_ingest(settings, "--sink", "olap", "--until-idle", "2", log=logs["idle"])
        _wait(lambda: _held(logs["idle"]), "a share for the idle process", idle, logs["idle"])
        member.send_signal(signal.SIGKILL)
        member.wait(30)
    finally:
        killed.set()
        feeder.join()
    dead = set(range(6)) - _held(logs["idle"])
    stored = _stored(settings, registry)
    assert dead and all(stored.get(p, 0) < publisher.ends[p] for p in dead), (
        "the killed member held no partition with work left: the race was not set up"
    )
    idle.communicate(timeout=180)
    assert idle.returncode == 0, logs["idle"].read_text()[-3000:]
    assert_exact(settings, registry, published, search=False)


def _feed(publisher: Publisher, wires: list[Wire], done: threading.Event) -> None:
    """About 500 messages a second until ``done``, then the rest at once."""
    sent = 0
    while sent < len(wires) and not done.is_set():
        publisher.send(wires[sent : sent + 50])
        sent += 50
        done.wait(0.1)
    publisher.send(wires[sent:])


def test_four_killed_ingesters_then_until_idle(
    small_batches: Settings, registry: SpecRegistry, tmp_path: Path
) -> None:
    """Each ingester starts at once after the previous one was killed, the last one
    ``--until-idle 5``, while the broker still counts the dead as members."""
    settings = small_batches
    published = _payments(seed=32)
    publisher = Publisher(settings, settings.topic(registry.get("payments").datasource.topic))
    publisher.send(published.wires)
    log = tmp_path / "ingest.log"
    rng = random.Random(32)
    for _ in range(4):
        proc = start_ingest(settings, "--sink", "olap", log=log)
        _kill_mid_run(settings, registry, proc, log, rng)
    stored = _stored(settings, registry)
    assert any(stored.get(p, 0) < end for p, end in publisher.ends.items()), (
        "four ingesters finished the topic: nothing left for the final run"
    )
    final = start_ingest(settings, "--sink", "olap", "--until-idle", "5", log=log)
    final.communicate(timeout=180)
    assert final.returncode == 0, log.read_text()[-3000:]
    assert_exact(settings, registry, published, search=False)


# --- the rule itself, in process -----------------------------------------------------------


def test_the_idle_rule_waits_for_partitions_another_member_holds(
    topics: Settings, registry: SpecRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    """Another member of the group holds partitions and stores nothing (stuck, say). The
    runner consumes its own share and goes quiet, yet does not stop until the other
    member leaves and it has consumed those partitions too."""
    settings = topics
    spec = registry.get("payments")
    topic = settings.topic(spec.datasource.topic)
    published = build(GeneratorConfig(transactions=2000, merchants=5, days=2, seed=41), 0.01)
    publisher = Publisher(settings, topic)
    publisher.send(published.wires)
    assert set(publisher.ends) == set(range(6))
    caplog.set_level(logging.INFO, logger="ingest.runner")

    stuck = Consumer(consumer_config(settings, settings.group("olap", spec.name)))
    stuck.subscribe([topic])
    deadline = time.monotonic() + 60
    while not stuck.assignment():
        assert time.monotonic() < deadline, "the other member got no partitions"
        stuck.poll(0.1)
    leave = threading.Event()
    member = threading.Thread(target=_stay_in_group, args=(stuck, leave))
    member.start()
    reports: list[RunReport] = []
    runner = threading.Thread(
        target=lambda: reports.extend(
            run_ingest(settings, [spec], ["olap"], threading.Event(), until_idle=1.0)
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 90
        while not _waited_with_a_share(caplog):
            assert runner.is_alive(), "the runner stopped while another member held partitions"
            assert time.monotonic() < deadline, "the runner never waited for the others"
            time.sleep(0.05)
    finally:
        leave.set()
        member.join()
    runner.join(120)
    assert not runner.is_alive() and reports and reports[0].error is None, reports
    assert _stored(settings, registry) == publisher.ends
    assert_exact(settings, registry, published, search=False)


def _waited_with_a_share(caplog: pytest.LogCaptureFixture) -> bool:
    """The runner was given partitions, then found others not consumed and waited."""
    messages = [r.getMessage() for r in caplog.records]
    given = [i for i, m in enumerate(messages) if (a := ASSIGNED.search(m)) and a.group(1)]
    return bool(given) and any("are not consumed yet" in m for m in messages[given[0] :])


def _stay_in_group(consumer: Consumer, leave: threading.Event) -> None:
    """Poll (so the group can rebalance) but store nothing; then leave the group."""
    while not leave.is_set():
        consumer.poll(0.1)
    consumer.close()


def test_the_end_probe_asks_a_fetch_not_end_offsets(broker: Broker, data_dir: Path) -> None:
    settings = broker_settings(broker, data_dir)
    topic = settings.topic("probe")
    admin = AdminClient(base_config(settings))
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    plain = producer(settings)
    for i in range(10):
        plain.produce(topic, value=b"plain %d" % i, partition=0)
    flush(plain, "plain")
    txn = Producer(base_config(settings) | {"transactional.id": f"{settings.topic_namespace}txn"})
    txn.init_transactions(30)
    txn.begin_transaction()
    for i in range(5):
        txn.produce(topic, value=b"txn %d" % i, partition=1)
    txn.commit_transaction(30)  # offsets 0-4, then the commit marker at 5

    # At the end; partition 1 short of its high watermark only by the commit marker;
    # partition 2 empty, with no position yet.
    assert unread(settings, topic, {0: 10, 1: 5, 2: OFFSET_BEGINNING}) == set()
    assert unread(settings, topic, {0: 9, 1: 4, 2: 0}) == {0, 1}
    assert unread(settings, topic, {0: 0, 1: 0, 2: OFFSET_BEGINNING}) == {0, 1}
    if broker.name == "tansu":  # it answers a position past the end with empty fetches
        with pytest.raises(BrokerError, match="recreated"):
            unread(settings, topic, {0: 15}, timeout_s=1.0)
    else:  # Kafka resets it to the beginning, as the sink's own consumer would
        assert unread(settings, topic, {0: 15}) == {0}


def test_quiet_counts_from_the_first_answer_even_after_an_early_message(
    topics: Settings, registry: SpecRegistry
) -> None:
    """A run whose first poll already returned messages (a fast group join) must still
    start its healthy period at the first prompt answer from the broker, or it never
    becomes idle."""
    spec = registry.get("payments")
    sink = OlapSink(topics, spec, open_store(topics, registry))
    runner = Runner(topics, spec, sink, threading.Event())
    consumer = Consumer(consumer_config(topics, topics.group("olap", spec.name)))
    try:
        runner._last_contact = time.monotonic() - 1.5  # a message, before any health check
        runner._check_health(consumer)
        assert runner._healthy_since is not None
        started = runner._healthy_since
        runner._last_contact = time.monotonic() - 1.5
        runner._check_health(consumer)
        assert runner._healthy_since == started  # answered all along: not restarted
    finally:
        consumer.close()
        sink.close()
