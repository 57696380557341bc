"""The ingest side of the ``tally`` command, run as an operator would: real
subprocesses against a real broker, checked through what they print and what lands."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from engines.process import ProcessRecord
from ingest.decode import Decoder, Message
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tests.brokers import Broker
from tests.cli import Ran, tally
from tests.ingest.conftest import env_for, free_port

# --- helpers shared with the other ingest CLI tests -------------------------------------


def ok_json(ran: Ran) -> Any:
    assert ran.code == 0, f"exit {ran.code}: {ran.err[-2000:]}"
    return ran.json()


def error_line(ran: Ran) -> str:
    """The command failed with exactly one ``error:`` line (log lines may precede it)."""
    assert ran.code != 0, ran.out
    assert "Traceback" not in ran.err, ran.err[-2000:]
    lines = [line for line in ran.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, ran.err
    return lines[0]


@dataclass(frozen=True)
class Consumed:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def _headers(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None,
) -> dict[str, bytes]:
    items = list(raw.items()) if isinstance(raw, dict) else (raw or [])
    return {k: v.encode() if isinstance(v, str) else (v or b"") for k, v in items}


def consume_exactly(
    settings: Settings, topic: str, count: int, timeout_s: float = 30.0
) -> list[Consumed]:
    """Every message of ``topic`` (all partitions from the beginning) once ``count`` have
    arrived. End offsets are not used: the development broker misreports them."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    meta = admin.list_topics(topic, timeout=10).topics[topic]
    assert meta.error is None, meta.error
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    out: list[Consumed] = []
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                if m.error():
                    continue
                out.append(
                    Consumed(
                        m.partition() or 0,
                        m.offset() or 0,
                        m.key(),
                        m.value(),
                        _headers(m.headers()),
                    )
                )
    finally:
        consumer.close()
    assert len(out) == count, f"{topic}: {len(out)} of {count} messages arrived"
    return out


def topic_partitions(settings: Settings) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    return {
        name: len(t.partitions)
        for name, t in topics.items()
        if name.startswith(settings.topic_namespace)
    }


def generate_file(path: Path, seed: int, *extra: str, data_dir: Path) -> dict[str, Any]:
    report = ok_json(
        tally(
            "generate",
            "--out",
            str(path),
            "--seed",
            str(seed),
            "--transactions",
            "300",
            "--merchants",
            "12",
            "--days",
            "3",
            "--malformed-rate",
            "0.04",
            "--format",
            "json",
            *extra,
            data_dir=data_dir,
        )
    )
    assert isinstance(report, dict)
    return report


def lines_of(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n") if line]


def key_of(value: bytes) -> bytes | None:
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    txn = event.get("txn_id") if isinstance(event, dict) else None
    return txn.encode() if isinstance(txn, str) else None


def expected_latest(spec: DatasourceSpec, values: list[bytes]) -> tuple[dict[str, Any], int]:
    """txn_id → (version, event_id) of the greatest version, and how many are rejected."""
    decoded = Decoder(spec).decode(Message("t", 0, i, key_of(v), v) for i, v in enumerate(values))
    latest: dict[str, tuple[int, str]] = {}
    for row in decoded.table.to_pylist():
        have = latest.get(row["txn_id"])
        if have is None or (row["version"], row["event_id"]) > have:
            latest[row["txn_id"]] = (row["version"], row["event_id"])
    return latest, len(decoded.rejected)


def stored_latest(env: dict[str, str]) -> dict[str, Any]:
    result = ok_json(
        tally("sql", "SELECT txn_id, version, event_id FROM payments", "--format", "json", env=env)
    )
    assert result["columns"] == ["txn_id", "version", "event_id"]
    return {r[0]: (r[1], r[2]) for r in result["rows"]}


# --- tally broker ------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running: a zombie (exited, not yet reaped by init) does not count."""
    return ProcessRecord.of(pid) is not None


@pytest.mark.slow
def test_broker_up_status_down(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    bootstrap = f"127.0.0.1:{port}"
    env = {"TALLY_DATA_DIR": str(data), "TALLY_KAFKA_BOOTSTRAP": bootstrap}
    pid_file = data / "broker" / "tansu.pid"

    before = ok_json(tally("broker", "status", "--format", "json", env=env))
    assert before["bootstrap"] == bootstrap
    assert (before["running"], before["reachable"], before["pid"]) == (False, False, None)

    pid: int | None = None
    try:
        up = ok_json(tally("broker", "up", "--format", "json", env=env))
        pid = up["pid"]
        assert isinstance(pid, int) and _alive(pid)
        assert (up["bootstrap"], up["running"], up["reachable"]) == (bootstrap, True, True)
        assert Path(up["log"]) == data / "broker" / "tansu.log"
        assert Path(up["log"]).exists()
        record = orjson.loads(pid_file.read_text())
        assert record["pid"] == pid and "tansu" in " ".join(record["cmdline"])
        # It speaks Kafka, not just TCP.
        admin = AdminClient({"bootstrap.servers": bootstrap})
        assert admin.list_topics(timeout=10).brokers

        again = ok_json(tally("broker", "up", "--format", "json", env=env))
        assert again["pid"] == pid and again["reachable"] is True

        status = ok_json(tally("broker", "status", "--format", "json", env=env))
        assert (status["bootstrap"], status["running"], status["reachable"], status["pid"]) == (
            bootstrap,
            True,
            True,
            pid,
        )
    finally:
        down = ok_json(tally("broker", "down", "--format", "json", env=env))
    assert (down["running"], down["reachable"], down["pid"]) == (False, False, None)
    assert not _alive(pid)
    assert not pid_file.exists()
    after = ok_json(tally("broker", "status", "--format", "json", env=env))
    assert (after["running"], after["reachable"], after["pid"]) == (False, False, None)
    # Down is idempotent too.
    assert ok_json(tally("broker", "down", "--format", "json", env=env))["reachable"] is False


def test_broker_up_refuses_a_port_someone_else_holds(broker: Broker, tmp_path: Path) -> None:
    env = {"TALLY_DATA_DIR": str(tmp_path), "TALLY_KAFKA_BOOTSTRAP": broker.bootstrap}
    line = error_line(tally("broker", "up", "--format", "json", env=env))
    assert broker.bootstrap in line
    assert not (tmp_path / "broker" / "tansu.pid").exists()


# --- tally topics create -----------------------------------------------------------------


def test_topics_create_is_idempotent_and_uses_the_configured_partitions(
    kafka_settings: Settings,
) -> None:
    env = {**env_for(kafka_settings), "TALLY_INGEST__PARTITIONS": "3"}
    ns = kafka_settings.topic_namespace
    want = {f"{ns}payments.v1", f"{ns}payments.v1.dlq"}
    assert not want & topic_partitions(kafka_settings).keys()

    first = ok_json(tally("topics", "create", "--format", "json", env=env))["topics"]
    assert {t["topic"]: (t["partitions"], t["created"]) for t in first} == {
        name: (3, True) for name in want
    }
    assert topic_partitions(kafka_settings) == dict.fromkeys(want, 3)

    second = ok_json(tally("topics", "create", "--format", "json", env=env))["topics"]
    assert {t["topic"]: (t["partitions"], t["created"]) for t in second} == {
        name: (3, False) for name in want
    }
    assert topic_partitions(kafka_settings) == dict.fromkeys(want, 3)


# --- tally generate ----------------------------------------------------------------------


def test_generate_is_deterministic_and_counts_what_it_wrote(
    tmp_path: Path, payments_spec: DatasourceSpec
) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    report = generate_file(a, 5, data_dir=tmp_path)
    generate_file(b, 5, data_dir=tmp_path)
    generate_file(c, 6, data_dir=tmp_path)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()

    values = lines_of(a)
    assert report["out"] == str(a)
    assert report["events"] == len(values) > 300
    latest, rejected = expected_latest(payments_spec, values)
    assert len(latest) == 300  # every approved payment, each once
    assert report["malformed"] == rejected > 0


@pytest.mark.parametrize("both", [False, True], ids=["neither", "both"])
def test_generate_needs_exactly_one_destination(both: bool, tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    args = ["--out", str(out), "--publish"] if both else []
    env = {"TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}  # nothing listens there
    ran = tally("generate", "--transactions", "10", *args, data_dir=tmp_path, env=env)
    assert ran.code == 2
    line = error_line(ran)
    assert "--out" in line and "--publish" in line
    assert ran.err.strip() == line
    assert ran.out == ""
    assert not out.exists()


# --- tally publish -------------------------------------------------------------------------


@pytest.mark.slow
def test_publish_sends_every_line_keyed_by_txn_id(topics: Settings, tmp_path: Path) -> None:
    env = env_for(topics)
    path = tmp_path / "events.jsonl"
    generate_file(path, 9, data_dir=tmp_path)
    values = lines_of(path)
    report = ok_json(tally("publish", str(path), "--format", "json", env=env))
    topic = topics.topic("payments.v1")
    unparsable = sum(1 for v in values if key_of(v) is None)
    assert report == {"published": len(values), "unparsable": unparsable, "topic": topic}
    assert unparsable > 0  # broken JSON lines are published too, as a buggy producer would

    got = consume_exactly(topics, topic, len(values))
    assert Counter(m.value for m in got) == Counter(values)
    partitions_of: dict[bytes, set[int]] = {}
    keyed = 0
    for m in got:
        assert m.value is not None
        txn = key_of(m.value)
        assert m.key == txn, (m.key, m.value[:80])
        if txn is not None:
            keyed += 1
            partitions_of.setdefault(txn, set()).add(m.partition)
    assert keyed == len(values) - unparsable
    # Keyed by entity: every event of a payment lands in one partition, in file order.
    assert all(len(p) == 1 for p in partitions_of.values())
    assert len({m.partition for m in got}) > 1
    for part in {m.partition for m in got}:
        sent = [v for v in values if (k := key_of(v)) is not None and part in partitions_of[k]]
        arrived = sorted((m for m in got if m.partition == part and m.key), key=lambda m: m.offset)
        assert [m.value for m in arrived] == sent


# --- tally ingest --------------------------------------------------------------------------


@pytest.mark.slow
def test_ingest_until_idle_processes_a_published_file(
    topics: Settings, registry: SpecRegistry, tmp_path: Path
) -> None:
    env = env_for(topics)
    path = tmp_path / "events.jsonl"
    generate_file(path, 21, data_dir=tmp_path)
    values = lines_of(path)
    ok_json(tally("publish", str(path), "--format", "json", env=env))

    report = ok_json(tally("ingest", "--until-idle", "3", "--format", "json", env=env))
    sinks = {s["sink"]: s for s in report["sinks"]}
    assert set(sinks) == {"olap", "search"}
    latest, rejected = expected_latest(registry.get("payments"), values)
    for name, s in sinks.items():
        assert s["datasource"] == "payments" and s["error"] is None, s
        assert s["consumed"] == len(values), name
        assert s["rejected"] == rejected, name
        assert s["written"] + s["stale"] + s["rejected"] == s["consumed"], s
        assert s["batches"] >= 1 and s["fenced"] == 0
    assert stored_latest(env) == latest


@pytest.mark.slow
def test_ingest_logs_one_json_object_a_line(topics: Settings) -> None:
    ran = tally(
        *("ingest", "--sink", "olap", "--until-idle", "0.5"),
        *("--format", "json", "--log-format", "json"),
        env=env_for(topics),
    )
    ok_json(ran)
    records = [orjson.loads(line) for line in ran.err.splitlines()]
    assert records, "the ingester logged nothing"
    for r in records:
        assert {"time", "level", "logger", "message"} <= set(r), r
        assert datetime.fromisoformat(r["time"]).utcoffset() is not None, r
    # The one line every run ends with (an empty topic may be consumed, by the state
    # rule, before the group has even assigned it).
    stopped = "olap/payments idle for 0.5s and the topic consumed, stopping"
    assert any(r["message"] == stopped and r["level"] == "INFO" for r in records), ran.err


def test_ingest_refuses_an_unknown_log_format(kafka_settings: Settings) -> None:
    ran = tally("ingest", "--log-format", "xml", env=env_for(kafka_settings))
    assert ran.code == 2
    line = error_line(ran)
    assert "xml" in line and "--log-format" in line
    assert ran.err.strip() == line


def test_ingest_rejects_an_unknown_sink(kafka_settings: Settings) -> None:
    ran = tally("ingest", "--sink", "bogus", "--until-idle", "1", env=env_for(kafka_settings))
    assert ran.code == 2
    line = error_line(ran)
    assert "bogus" in line and "--sink" in line
    assert ran.err.strip() == line


@pytest.mark.parametrize("command", [("dlq", "list"), ("topics", "create")])
def test_a_command_meeting_a_broker_that_is_down_prints_one_line(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    """librdkafka's own log lines (``%3|…|FAIL|…``) go through Python logging, which a
    one-shot command does not print: its one-line error is all there is."""
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    ran = tally(*command, env={"TALLY_KAFKA_BOOTSTRAP": down, "TALLY_DATA_DIR": str(tmp_path)})
    line = error_line(ran)
    assert ran.err.strip() == line, ran.err[:2000]
    assert "rdkafka" not in ran.err and "%3|" not in ran.err


@pytest.mark.slow
def test_ingest_without_topics_says_to_create_them(kafka_settings: Settings) -> None:
    topic = kafka_settings.topic("payments.v1")
    # tally() times out after 120 s, so a hang fails the test instead of blocking it.
    ran = tally("ingest", "--until-idle", "3", "--format", "json", env=env_for(kafka_settings))
    line = error_line(ran)
    assert ran.code == 1
    assert "tally topics create" in line and topic in line
    assert topic not in topic_partitions(kafka_settings)  # and nothing was auto-created
