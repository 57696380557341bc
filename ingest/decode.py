"""Decode and validate messages against a datasource spec, straight into Arrow columns.

Each message is one JSON object carrying an entity's full state. Anything that cannot
become a valid row — broken JSON, a missing or mistyped field, a float where money
(integer minor units) belongs, a time without an offset, an unknown event type, a
Kafka key that is not the entity id — is returned as a dead letter with the reason,
never raised: one poison message must not stop or slow its partition.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa

from storage.embedded.segments import base_schema
from tally.specs import Column, DatasourceSpec


@dataclass(frozen=True)
class Message:
    """The parts of a Kafka message decoding needs (decoupled from the client type)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


@dataclass(frozen=True)
class Rejected:
    message: Message
    reason: str


@dataclass
class Decoded:
    table: pa.Table
    rejected: list[Rejected] = field(default_factory=list)
    newest_produce_ms: int | None = None
    partitions: list[int] = field(default_factory=list)  # source partition of each row


class _Invalid(Exception):
    pass


class Decoder:
    def __init__(self, spec: DatasourceSpec) -> None:
        self.spec = spec
        full = base_schema(spec)
        self.schema = pa.schema([f for f in full if f.name != "_deleted"])
        self._checks = [(name, _checker(name, col)) for name, col in spec.columns.items()]
        ds = spec.datasource
        self._event_type = ds.event_type
        self._event_types = frozenset(ds.event_types)
        self._key = ds.key

    def decode(self, messages: Iterable[Message]) -> Decoded:
        columns: dict[str, list[Any]] = {name: [] for name, _ in self._checks}
        rejected: list[Rejected] = []
        partitions: list[int] = []
        newest: int | None = None
        for message in messages:
            try:
                values = self._row(message)
            except _Invalid as exc:
                rejected.append(Rejected(message, str(exc)))
                continue
            for name, value in values:
                columns[name].append(value)
            partitions.append(message.partition)
            if message.timestamp_ms is not None and (
                newest is None or message.timestamp_ms > newest
            ):
                newest = message.timestamp_ms
        arrays = [pa.array(columns[f.name], f.type) for f in self.schema]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        return Decoded(table, rejected, newest, partitions)

    def _row(self, message: Message) -> list[tuple[str, Any]]:
        if message.value is None:
            raise _Invalid("empty message (tombstone records are not events)")
        try:
            event = orjson.loads(message.value)
        except orjson.JSONDecodeError as exc:
            raise _Invalid(f"not JSON: {exc}") from None
        if not isinstance(event, dict):
            raise _Invalid(f"not a JSON object but {type(event).__name__}")
        out = []
        for name, check in self._checks:
            out.append((name, check(event.get(name, _MISSING))))
        if self._event_type and self._event_types:
            kind = event.get(self._event_type)
            if kind not in self._event_types:
                raise _Invalid(f"unknown {self._event_type} {kind!r}")
        if message.key is not None:
            key = message.key.decode("utf-8", "replace")
            if key != event.get(self._key):
                raise _Invalid(f"Kafka key {key!r} is not the {self._key} {event.get(self._key)!r}")
        return out


_MISSING = object()


def _checker(name: str, col: Column) -> Any:
    values = frozenset(col.values) if col.values else None
    pattern = re.compile(col.pattern) if col.pattern else None
    minimum = col.min

    def check(value: Any) -> Any:
        if value is _MISSING:
            if col.nullable:
                return None
            raise _Invalid(f"missing field {name!r}")
        if value is None:
            if col.nullable:
                return None
            raise _Invalid(f"field {name!r} is null")
        if col.type == "string":
            if type(value) is not str:
                raise _Invalid(f"field {name!r} must be a string, got {_kind(value)}")
            if values is not None and value not in values:
                raise _Invalid(f"field {name!r} has unknown value {value!r}")
            if pattern is not None and not pattern.match(value):
                raise _Invalid(f"field {name!r} value {value!r} does not match {pattern.pattern}")
            return value
        if col.type == "int":
            if type(value) is not int:
                hint = " (money is integer minor units)" if type(value) is float else ""
                raise _Invalid(f"field {name!r} must be an integer, got {_kind(value)}{hint}")
            if minimum is not None and value < minimum:
                raise _Invalid(f"field {name!r} must be ≥ {minimum}, got {value}")
            if not -(2**63) <= value < 2**63:
                raise _Invalid(f"field {name!r} does not fit 64 bits")
            return value
        if col.type == "timestamp":
            if type(value) is not str:
                raise _Invalid(f"field {name!r} must be an RFC 3339 time, got {_kind(value)}")
            try:
                ts = datetime.fromisoformat(value)
            except ValueError:
                raise _Invalid(f"field {name!r} is not an RFC 3339 time: {value!r}") from None
            if ts.utcoffset() is None:
                raise _Invalid(f"field {name!r} has no UTC offset: {value!r}")
            return ts
        if type(value) is not bool:
            raise _Invalid(f"field {name!r} must be true or false, got {_kind(value)}")
        return value

    return check


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        float: "a number with a fraction",
        int: "an integer",
    }.get(type(value), type(value).__name__)
