"""Kafka clients for Tally, built from settings, with errors translated at the boundary.

librdkafka reports most trouble asynchronously (error callbacks, per-message
errors); everything that reaches Tally's code is turned into ``BrokerUnavailable``
(transient: retry with backoff, lose nothing) or ``BrokerError`` (terminal).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ingest.decode import Message
from storage import StoredPosition, logmark
from tally.errors import BrokerError, BrokerUnavailable, TallyError
from tally.settings import Settings
from tally.specs import DatasourceSpec

log = logging.getLogger(__name__)

_TRANSIENT = {
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._MSG_TIMED_OUT,
    KafkaError._RESOLVE,
    KafkaError._QUEUE_FULL,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NETWORK_EXCEPTION,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.REBALANCE_IN_PROGRESS,
}


def translate(error: KafkaError | KafkaException | BaseException, what: str) -> TallyError:
    err = error.args[0] if isinstance(error, KafkaException) and error.args else error
    if isinstance(err, KafkaError):
        cls = BrokerUnavailable if (err.code() in _TRANSIENT or err.retriable()) else BrokerError
        return cls(f"{what}: {err.str()}")
    return BrokerUnavailable(f"{what}: {error}")


def _quiet(err: KafkaError) -> None:
    """librdkafka's error callback: connection trouble is retried by the client itself."""
    log.debug("kafka: %s", err.str())


# librdkafka's own log lines (it prints them to stderr by itself): through Python
# logging instead, so a daemon logs them in its one format and a one-shot command,
# which configures no logging, prints only its one-line error (the NullHandler keeps
# Python's last-resort handler from printing them).
CLIENT_LOG = logging.getLogger("tally.kafka.client")
CLIENT_LOG.addHandler(logging.NullHandler())


def base_config(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "error_cb": _quiet,
        "log_level": 3,
        "logger": CLIENT_LOG,
    }
    if settings.kafka_password is not None:
        conf |= {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": settings.kafka_user or "tally",
            "sasl.password": settings.kafka_password.get_secret_value(),
        }
    return conf


def consumer_config(settings: Settings, group: str) -> dict[str, Any]:
    return base_config(settings) | {
        "group.id": group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "session.timeout.ms": settings.ingest.session_timeout_ms,
        "heartbeat.interval.ms": settings.ingest.heartbeat_interval_ms,
        "fetch.wait.max.ms": 100,
        "isolation.level": "read_committed",  # explicit: aborted transactions never reach a sink
        "queued.max.messages.kbytes": 65536,
    }


def unread(
    settings: Settings, topic: str, positions: Mapping[int, int], timeout_s: float = 5.0
) -> set[int]:
    """The partitions of ``topic`` holding a message at or after ``positions[p]`` (an
    offset, or ``OFFSET_BEGINNING``), asked by fetching there.

    Each partition answers a fetch with its first message or with end-of-partition:
    nothing at or beyond, which includes a position short of the high watermark only
    by transaction markers. Offsets from ListOffsets are not used: the development
    broker misreports them, while its fetch responses are right. The consumer joins
    no group and commits nothing, and reads as the sinks' consumers do (committed
    transactions; a position the log no longer holds resets to its beginning). A
    partition that does not answer within ``timeout_s`` raises BrokerUnavailable.
    """
    consumer = outside_consumer(
        settings,
        f"{settings.topic_namespace}tally.end-probe",
        **_SCAN,
        **{"auto.offset.reset": "earliest", "fetch.wait.max.ms": 100},
    )
    pending, found = set(positions), set()
    try:
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in positions.items()])
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.1):
                part, err = m.partition(), m.error()
                if part not in pending:
                    continue
                if err is None:
                    found.add(part)
                elif err.code() != KafkaError._PARTITION_EOF:
                    log.debug("end probe %s [%s]: %s", topic, part, err.str())
                    continue
                pending.discard(part)
        if pending:
            _past_the_end(consumer, topic, positions, pending)
    except KafkaException as exc:
        raise translate(exc, f"probing the end of {topic}") from exc
    finally:
        consumer.close()
    if pending:
        raise BrokerUnavailable(
            f"probing the end of {topic}: partitions {sorted(pending)} did not answer"
        )
    return found


# Reading assigned partitions as the sinks do (committed transactions only), told when
# each reaches its end.
_SCAN: dict[str, Any] = {"enable.partition.eof": True, "isolation.level": "read_committed"}


def _past_the_end(
    consumer: Consumer, topic: str, positions: Mapping[int, int], silent: set[int]
) -> None:
    """Kafka resets a position past the end; the development broker answers it with
    empty fetches for ever (their high watermark, cached, shows why): a sink holding
    such a position belongs to another log, the topic was recreated."""
    for part in sorted(silent):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
        if high is not None and 0 <= high < positions[part]:
            raise BrokerError(
                f"{topic} [{part}] ends at offset {high}, before {positions[part]} where the"
                " sink resumes: the topic was recreated (the old one's data is gone)"
            )


def producer(settings: Settings, **extra: Any) -> Producer:
    conf = base_config(settings) | {
        # Batches per partition: the broker's cost is per request, and on a small
        # machine a 5 ms linger made the development broker the busiest process.
        "linger.ms": 25,
        "compression.type": "lz4",
        "message.timeout.ms": 300_000,
        "enable.idempotence": False,  # tansu's idempotent-producer support is partial
    }
    return Producer(conf | extra)


def flush(prod: Producer, what: str, timeout_s: float = 30.0) -> None:
    """Wait until everything produced is acknowledged, or raise BrokerUnavailable."""
    deadline = time.monotonic() + timeout_s
    while (left := prod.flush(min(1.0, max(0.0, deadline - time.monotonic())))) > 0:
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(f"{what}: {left} message(s) not acknowledged in {timeout_s:g}s")


def ensure_topics(
    settings: Settings, specs: Iterable[DatasourceSpec], partitions: int | None = None
) -> list[dict[str, Any]]:
    """Create each datasource's topic and dead-letter topic (and, where the engine
    ingests from Kafka itself, its refined topic); existing ones are kept."""
    from storage import backend

    admin = AdminClient(base_config(settings))
    wanted = partitions or settings.ingest.partitions
    refined = backend(settings.store.backend).capabilities.ingests_from_kafka
    specs = list(specs)
    names = []
    for spec in specs:
        names += [settings.topic(spec.datasource.topic), settings.topic(spec.dead_letter_topic)]
    try:
        existing = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise translate(exc, "listing topics") from exc
    report = []
    todo = [
        NewTopic(n, num_partitions=wanted, replication_factor=1) for n in names if n not in existing
    ]
    futures = admin.create_topics(todo, operation_timeout=10) if todo else {}
    for name in names:
        if name in futures:
            try:
                futures[name].result()
                report.append({"topic": name, "partitions": wanted, "created": True})
                continue
            except KafkaException as exc:
                err = exc.args[0]
                if not (
                    isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS
                ):
                    raise translate(exc, f"creating topic {name}") from exc
        count = len(existing[name].partitions) if name in existing else wanted
        report.append({"topic": name, "partitions": count, "created": False})
    for spec in specs if refined else ():
        for target, config in derived_topics(settings, spec).items():
            count = ensure_like(settings, settings.topic(spec.datasource.topic), target, config)
            report.append({"topic": target, "partitions": count, "created": target not in existing})
    return report


def derived_topics(settings: Settings, spec: DatasourceSpec) -> dict[str, dict[str, str]]:
    """The topics the relay writes for an engine that ingests from Kafka, with their
    config: refined rows; with rollups, one deltas topic each and the compacted
    per-key state changelog (``storage.keystate``)."""
    from storage.refined import refined_topic, rollup_topic, state_topic

    topics: dict[str, dict[str, str]] = {refined_topic(settings, spec): {}}
    for rollup in spec.rollups:
        topics[rollup_topic(settings, spec, rollup)] = {}
    if spec.rollups:
        topics[state_topic(settings, spec)] = {"cleanup.policy": "compact"}
    return topics


def partition_count(settings: Settings, topic: str) -> int | None:
    """How many partitions ``topic`` has (None: it does not exist)."""
    admin = AdminClient(base_config(settings))
    try:
        meta = admin.list_topics(topic, timeout=10).topics.get(topic)
    except KafkaException as exc:
        raise translate(exc, f"describing {topic}") from exc
    if meta is None or meta.error is not None:
        return None
    return len(meta.partitions)


def ensure_like(
    settings: Settings, source: str, target: str, config: Mapping[str, str] | None = None
) -> int:
    """Create ``target`` with as many partitions as ``source`` (kept if it exists with
    that many), with topic ``config``; returns the count. A partition-for-partition
    copy needs equal counts."""
    count = partition_count(settings, source)
    if count is None:
        raise BrokerError(f"topic {source} does not exist (run: tally topics create)")
    have = partition_count(settings, target)
    if have is None:
        admin = AdminClient(base_config(settings))
        futures = admin.create_topics(
            [
                NewTopic(
                    target, num_partitions=count, replication_factor=1, config=dict(config or {})
                )
            ],
            operation_timeout=10,
        )
        try:
            futures[target].result()
        except KafkaException as exc:
            err = exc.args[0]
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise translate(exc, f"creating topic {target}") from exc
        deadline = time.monotonic() + 10  # metadata reaches the brokers a moment later
        while (have := partition_count(settings, target)) is None and time.monotonic() < deadline:
            time.sleep(0.1)
    if have != count:
        raise BrokerError(
            f"topic {target} has {have} partitions, {source} has {count}: they must be equal"
            " (each row goes to its source message's partition number)"
        )
    return count


def outside_consumer(settings: Settings, group: str, **extra: Any) -> Consumer:
    """A consumer that never joins ``group`` and never commits by itself: for reading
    positions, (with ``_SCAN``) messages at assigned positions, or committing as a group
    without members (``tally ingest reset``)."""
    return Consumer(
        base_config(settings)
        | {"group.id": group, "enable.auto.commit": False, "enable.auto.offset.store": False}
        | extra
    )


def committed_offsets(
    settings: Settings, group: str, topic: str, partitions: list[int]
) -> dict[int, int]:
    """A consumer group's committed offsets, read without joining the group."""
    consumer = outside_consumer(settings, group)
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    except KafkaException as exc:
        raise translate(exc, f"reading the committed offsets of {group}") from exc
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


def committed_positions(
    consumer: Consumer, partitions: list[tuple[str, int]], timeout_s: float = 30.0
) -> dict[tuple[str, int], StoredPosition | None]:
    """The consumer's group's committed offsets, with the log each is of. A passing
    refusal (the group's coordinator moving or loading) is asked again until
    ``timeout_s``: this runs where a partition is taken over, and giving up there
    stops the sink."""
    if not partitions:
        return {}
    wanted = [TopicPartition(t, p) for t, p in partitions]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = consumer.committed(wanted, timeout=min(10.0, timeout_s))
            failed = next((tp.error for tp in got if tp.error is not None), None)
            if failed is None:
                break
            err = translate(KafkaException(failed), "reading committed offsets")
        except KafkaException as exc:
            err = translate(exc, "reading committed offsets")
        if not err.transient or time.monotonic() > deadline:
            raise err
        log.info("%s, asking again", err.message)
        time.sleep(0.2)
    return {(tp.topic, tp.partition): logmark.decode(tp.offset, tp.metadata) for tp in got}


def topic_id(admin: AdminClient, topic: str, timeout_s: float = 5.0) -> str | None:
    """The topic's id (KIP-516; new each time the topic is created), or None where the
    broker gives none (an all-zero id). A topic that does not exist raises BrokerError."""
    try:
        found = admin.describe_topics(TopicCollection([topic]), request_timeout=timeout_s)[
            topic
        ].result()
    except KafkaException as exc:
        err = translate(exc, f"describing {topic}")
        if not err.transient:
            raise BrokerError(f"topic {topic} does not exist or cannot be described") from exc
        raise err from exc
    ident = str(found.topic_id) if found.topic_id is not None else ""
    return ident if ident.strip("A=") else None  # base64 of sixteen zero bytes: none


def log_bounds(settings: Settings, topic: str, partitions: list[int]) -> dict[int, tuple[int, int]]:
    """Each partition's (start, end) as a fetch reports them: a reader assigned at the
    beginning takes the watermarks of the first fetch response (the development
    broker misreports them to ListOffsets, not in fetches); Kafka answers both alike."""
    consumer = outside_consumer(
        settings,
        f"{settings.topic_namespace}tally.bounds",
        **_SCAN,
        **{"auto.offset.reset": "earliest", "fetch.wait.max.ms": 100},
    )
    out: dict[int, tuple[int, int]] = {}
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + 10
        while len(out) < len(partitions) and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.2):
                part = m.partition()
                if part is None or part in out:
                    continue
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), cached=True)
                if low is not None and high is not None and low >= 0 and high >= 0:
                    out[part] = (low, high)
        for part in set(partitions) - set(out):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
            out[part] = (low, high)
    except KafkaException as exc:
        raise translate(exc, f"reading the bounds of {topic}") from exc
    finally:
        consumer.close()
    return out


def end_offsets(settings: Settings, topic: str, partitions: list[int]) -> dict[int, int]:
    """Each partition's end (high watermark: a transaction's marker included)."""
    consumer = outside_consumer(settings, f"{settings.topic_namespace}tally.ends")
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    except KafkaException as exc:
        raise translate(exc, f"reading the end offsets of {topic}") from exc
    finally:
        consumer.close()


def read_ranges(
    settings: Settings, ranges: Mapping[tuple[str, int], tuple[int, int]], timeout_s: float = 60.0
) -> list[Message]:
    """Every committed message at offsets [start, end) of each (topic, partition), in
    offset order per partition, as the sinks' consumers read them (read_committed; no
    group joined). A range the log no longer holds in full is BrokerError: what is
    missing cannot be read again (retention removed it)."""
    wanted = {tp: rng for tp, rng in ranges.items() if rng[1] > rng[0]}
    if not wanted:
        return []
    consumer = outside_consumer(
        settings,
        f"{settings.topic_namespace}tally.range-reader",
        **_SCAN,
        **{"auto.offset.reset": "error"},
    )
    out: list[Message] = []
    try:
        consumer.assign([TopicPartition(t, p, s) for (t, p), (s, _e) in wanted.items()])
        done: set[tuple[str, int]] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(wanted):
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"reading back {sorted(set(wanted) - done)}: timed out")
            for m in consumer.consume(1000, 0.5):
                tp = (m.topic() or "", m.partition() or 0)
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and tp in wanted:
                        if (m.offset() or 0) < wanted[tp][1]:
                            raise BrokerError(f"{tp[0]}[{tp[1]}] ends before {wanted[tp][1]}")
                        done.add(tp)
                        continue
                    raise translate(KafkaException(err), f"reading back {tp[0]}[{tp[1]}]")
                offset = m.offset() or 0
                if tp in done or offset >= wanted[tp][1]:
                    done.add(tp)
                    continue
                _ts_type, ts = m.timestamp()  # assigned at the start: offset ≥ it
                out.append(Message(tp[0], tp[1], offset, m.key(), m.value(), ts))
                if offset + 1 >= wanted[tp][1]:
                    done.add(tp)
    except KafkaException as exc:
        raise translate(exc, "reading back a batch") from exc
    finally:
        consumer.close()
    return out
