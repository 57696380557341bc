"""Decode and validate messages against a datasource spec, straight into Arrow columns.

Each message is one JSON object carrying an entity's full state. Anything that cannot
become a valid row — broken JSON, a missing or mistyped field, a float where money
(integer minor units) belongs, a time without an offset, an unknown event type, a
Kafka key that is not the entity id — is returned as a dead letter with the reason,
never raised: one poison message must not stop or slow its partition.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import pyarrow as pa

from storage.schema import row_schema
from tally.specs import DatasourceSpec


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
    offsets: list[int] = field(default_factory=list)  # source offset of each row


class _Invalid(Exception):
    pass


_INT64 = {"ge": -(2**63), "le": 2**63 - 1}
_TYPES: dict[str, Any] = {"string": str, "int": int, "timestamp": datetime, "bool": bool}


def event_struct(spec: DatasourceSpec) -> type[msgspec.Struct]:
    """A msgspec Struct generated from the spec: decoding *is* validation, in C.

    Strict by construction: an int column refuses floats and booleans (money is
    integer minor units), a timestamp refuses times without an offset, enum columns
    and the event type accept only their declared values, non-nullable columns
    refuse null and absence. Unknown fields are ignored (producers may add some).
    """
    ds = spec.datasource
    fields: list[tuple[Any, ...]] = []
    for name, col in spec.columns.items():
        typ: Any = _TYPES[col.type]
        meta: dict[str, Any] = {}
        if col.type == "timestamp":
            meta["tz"] = True
        if col.type == "int":
            meta.update(_INT64)
            if col.min is not None:
                meta["ge"] = col.min
        if col.pattern:
            meta["pattern"] = col.pattern
        if col.values:
            typ = Literal[tuple(col.values)]
        elif name == ds.event_type and ds.event_types:
            typ = Literal[tuple(ds.event_types)]
        if meta:
            typ = Annotated[typ, msgspec.Meta(**meta)]
        if col.nullable:
            fields.append((name, typ | None, None))
        else:
            fields.append((name, typ))
    return msgspec.defstruct(f"{spec.name.title()}Event", fields, kw_only=True)


class Decoder:
    def __init__(self, spec: DatasourceSpec) -> None:
        self.spec = spec
        self.schema = row_schema(spec)
        self._decoder = msgspec.json.Decoder(event_struct(spec))
        self._key_index = list(spec.columns).index(spec.datasource.key)
        self._ints = {n for n, c in spec.columns.items() if c.type == "int"}

    def decode(self, messages: Iterable[Message]) -> Decoded:
        rows: list[tuple[Any, ...]] = []
        rejected: list[Rejected] = []
        partitions: list[int] = []
        offsets: list[int] = []
        newest: int | None = None
        decode = self._decoder.decode
        astuple = msgspec.structs.astuple
        key_index = self._key_index
        for message in messages:
            try:
                if message.value is None:
                    raise _Invalid("empty message (tombstone records are not events)")
                row = astuple(decode(message.value))
                if (
                    message.key is not None
                    and message.key.decode("utf-8", "replace") != row[key_index]
                ):
                    raise _Invalid(
                        f"Kafka key {message.key.decode('utf-8', 'replace')!r} is not the "
                        f"{self.spec.datasource.key} {row[key_index]!r}"
                    )
            except msgspec.ValidationError as exc:
                rejected.append(Rejected(message, self._reason(str(exc))))
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                rejected.append(Rejected(message, f"not valid JSON: {exc}"))
                continue
            except _Invalid as exc:
                rejected.append(Rejected(message, str(exc)))
                continue
            rows.append(row)
            partitions.append(message.partition)
            offsets.append(message.offset)
            ts = message.timestamp_ms
            if ts is not None and (newest is None or ts > newest):
                newest = ts
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(self.schema)
        arrays = [pa.array(col, f.type) for col, f in zip(columns, self.schema, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        return Decoded(table, rejected, newest, partitions, offsets)

    def _reason(self, text: str) -> str:
        if "got `float`" in text and any(text.endswith(f"$.{n}`") for n in self._ints):
            return text + " (money and counts are integers: minor units)"
        return text
