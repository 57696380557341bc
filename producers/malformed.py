"""Turn a share of well-formed events into the malformed messages real streams carry.

Kinds, chosen with a seeded RNG so a run is reproducible: broken JSON, a missing
required field, a wrong type (a float amount, a string version), an unknown event
type, a time without an offset. Each malformed message keeps the entity's key,
the way a buggy producer would still send it.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from tally.specs import DatasourceSpec

KINDS = ("broken_json", "missing_field", "wrong_type", "unknown_event_type", "naive_time")


@dataclass(frozen=True)
class Wire:
    key: bytes | None
    value: bytes
    malformed: str | None  # the kind, or None for a good event


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


@dataclass(frozen=True)
class Corruptible:
    """Which fields of a datasource's events a buggy producer gets wrong, from its spec:
    required fields to drop, integers to mistype, the event type and the time."""

    required: tuple[str, ...]
    integers: tuple[str, ...]
    version: str
    time: str
    event_type: str | None
    event_types: tuple[str, ...]

    @classmethod
    def of(cls, spec: DatasourceSpec) -> Corruptible:
        ds = spec.datasource
        ints = tuple(n for n, c in spec.columns.items() if c.type == "int" and not c.nullable)
        plain = tuple(n for n in ints if n != ds.version)
        return cls(
            required=(ds.tenant, *plain[:2], ds.time, ds.version),
            integers=(*plain[:2], ds.version),
            version=ds.version,
            time=ds.time,
            event_type=ds.event_type,
            event_types=ds.event_types,
        )


@functools.cache
def _payments() -> Corruptible:
    from producers.generate import payments_spec

    return Corruptible.of(payments_spec())


def corrupt(
    event: dict[str, Any], kind: str, rng: random.Random, fields: Corruptible | None = None
) -> bytes:
    f = fields or _payments()
    bad = dict(event)
    if kind == "unknown_event_type" and f.event_type is None:
        kind = "wrong_type"  # a datasource without event types has none to get wrong
    if kind == "broken_json":
        text = encode(bad)
        return text[: rng.randrange(1, max(2, len(text) - 1))]
    if kind == "missing_field":
        del bad[rng.choice(f.required)]
    elif kind == "wrong_type":
        field = rng.choice(f.integers)
        bad[field] = bad[field] + 0.5 if field != f.version else str(bad[field])
    elif kind == "unknown_event_type":
        assert f.event_type is not None
        domain = (f.event_types or ("event.x",))[0].split(".")[0]
        bad[f.event_type] = rng.choice(
            [f"{domain}.refunded", (f.event_types or ("X",))[0].upper(), "chargeback"]
        )
    else:
        bad[f.time] = str(bad[f.time])[:19]  # drop the offset
    return encode(bad)


def with_malformed(
    events: Iterable[dict[str, Any]],
    rate: float,
    seed: int,
    key_field: str = "txn_id",
    spec: DatasourceSpec | None = None,
) -> Iterator[Wire]:
    """Yield every event; after a ``rate`` share of them, also a malformed variant (of
    ``spec``'s fields; payments' by default)."""
    rng = random.Random(seed ^ 0x5EED)
    fields = Corruptible.of(spec) if spec is not None else None
    if spec is not None:
        key_field = spec.datasource.key
    for event in events:
        key = str(event.get(key_field, "")).encode() or None
        yield Wire(key, encode(event), None)
        if rate and rng.random() < rate:
            kind = rng.choice(KINDS)
            yield Wire(key, corrupt(event, kind, rng, fields), kind)
