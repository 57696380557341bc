"""``tally ingest reset``: an operator's decision for partitions a sink stopped because
their stored position is not of the log it reads (``ingest.positions``, ADR 0013).

``--to earliest`` reads the topic again from its start: the store's version guard makes
what it already holds a no-op, so nothing is counted twice; what the log no longer holds
stays as stored (``tally verify`` then lists what the store misses or holds beyond the
log). ``--to latest`` skips what the log holds now. ``--to stored`` keeps the offsets and
adopts the log they are in (an operator who knows the offsets are right, e.g. a cluster
restored with its offsets intact). Each position is recorded with the topic's id and a
note of what, who and when, where the sink keeps its positions: the OLAP store's catalog,
or the search group's committed offsets (their metadata).

Only while the sink's ingesters are stopped: a running member would commit over the
reset (Kafka itself refuses a group commit from outside a group with members).
"""

from __future__ import annotations

import getpass
import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from ingest.kafka import (
    base_config,
    committed_positions,
    log_bounds,
    outside_consumer,
    partition_count,
    topic_id,
    translate,
)
from storage import StoredPosition, logmark, open_store
from tally.errors import BrokerError, InvalidArgument
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry

log = logging.getLogger(__name__)
MODES = ("earliest", "latest", "stored")
SINKS = ("olap", "search")
TP = tuple[str, int]
# What a group with members answers a commit from outside it.
_GROUP_ACTIVE = {
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.REBALANCE_IN_PROGRESS,
}


class Positions(Protocol):
    """Where one sink keeps its positions."""

    def read(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]: ...

    def write(self, positions: Mapping[TP, StoredPosition]) -> None: ...

    def close(self) -> None: ...


class _StorePositions:
    """The OLAP sink's: the store's (its catalog; on an engine that ingests from Kafka,
    the relay group's committed offsets, which the store reads and writes)."""

    def __init__(self, settings: Settings, registry: SpecRegistry, spec: DatasourceSpec) -> None:
        self.spec = spec
        self.store = open_store(settings, registry)

    def read(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        stored = self.store.stored_positions(self.spec.name)
        return {tp: stored.get(tp) for tp in partitions}

    def write(self, positions: Mapping[TP, StoredPosition]) -> None:
        self.store.reset_positions(self.spec.name, positions)

    def close(self) -> None:
        self.store.close()


class _GroupPositions:
    """The search sink's: its group's committed offsets, committed from outside the
    group (which Kafka accepts only while the group has no members)."""

    def __init__(self, settings: Settings, group: str, datasource: str) -> None:
        self.group, self.datasource = group, datasource
        self.consumer = outside_consumer(settings, group)

    def read(self, partitions: list[TP]) -> dict[TP, StoredPosition | None]:
        return committed_positions(self.consumer, partitions)

    def write(self, positions: Mapping[TP, StoredPosition]) -> None:
        offsets = [
            TopicPartition(t, p, pos.offset, metadata=logmark.encode(pos.log, pos.reset))
            for (t, p), pos in positions.items()
        ]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() in _GROUP_ACTIVE:
                # A broker whose group descriptions list no members (the development
                # broker) still refuses a commit from outside a group that has some.
                raise InvalidArgument(
                    _running(self.group, None, self.datasource, "search")
                ) from exc
            raise translate(exc, "committing the reset positions") from exc

    def close(self) -> None:
        self.consumer.close()


def default_actor() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def reset(
    settings: Settings,
    registry: SpecRegistry,
    spec: DatasourceSpec,
    sink: str,
    to: str,
    actor: str | None = None,
) -> list[dict[str, Any]]:
    """Set every partition's position of ``sink`` as ``to`` says; returns, per
    partition, what was stored, what is now, and the log's bounds."""
    if sink not in SINKS:
        raise InvalidArgument(f"--sink {sink!r} is not one of {', '.join(SINKS)}")
    if to not in MODES:
        raise InvalidArgument(f"--to {to!r} is not one of {', '.join(MODES)}")
    topic = settings.topic(spec.datasource.topic)
    group = settings.group(sink, spec.name)
    admin = AdminClient(base_config(settings))
    _require_stopped(admin, group, spec.name, sink)
    count = partition_count(settings, topic)
    if count is None:
        raise BrokerError(f"topic {topic} does not exist (run: tally topics create)")
    parts = list(range(count))
    log_now = topic_id(admin, topic)
    bounds = log_bounds(settings, topic, parts)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    note = f"to {to} by {actor or default_actor()} at {when}"
    positions: Positions = (
        _StorePositions(settings, registry, spec)
        if sink == "olap"
        else _GroupPositions(settings, group, spec.name)
    )
    try:
        stored = positions.read([(topic, p) for p in parts])
        new: dict[TP, StoredPosition] = {}
        rows = []
        for p in parts:
            old = stored.get((topic, p))
            low, high = bounds[p]
            offset = {"earliest": low, "latest": high}.get(to, None if old is None else old.offset)
            if offset is not None:
                new[(topic, p)] = StoredPosition(offset, log_now, note)
            rows.append(
                {
                    "partition": p,
                    "stored": None if old is None else old.offset,
                    "stored_log": None if old is None else old.log,
                    "now": offset,
                    "log": log_now,
                    "log_start": low,
                    "log_end": high,
                }
            )
        positions.write(new)
    finally:
        positions.close()
    log.warning("%s/%s positions reset %s: %s", sink, spec.name, note, new)
    return rows


def _require_stopped(admin: AdminClient, group: str, datasource: str, sink: str) -> None:
    try:
        found = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except KafkaException as exc:
        err = translate(exc, f"describing group {group}")
        if err.transient:
            raise err from exc
        return  # no such group: nothing runs
    if found.members:
        raise InvalidArgument(_running(group, len(found.members), datasource, sink))


def _running(group: str, members: int | None, datasource: str, sink: str) -> str:
    return (
        f"{group} has {members or 'some'} active member(s): stop"
        f" `tally ingest --datasource {datasource} --sink {sink}` first (a running"
        " ingester would commit over the reset)"
    )
