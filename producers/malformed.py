"""Turn a share of well-formed events into the malformed messages real streams carry.

Kinds, chosen with a seeded RNG so a run is reproducible: broken JSON, a missing
required field, a wrong type (a float amount, a string version), an unknown event
type, a time without an offset. Each malformed message keeps the entity's key,
the way a buggy producer would still send it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

KINDS = ("broken_json", "missing_field", "wrong_type", "unknown_event_type", "naive_time")


@dataclass(frozen=True)
class Wire:
    key: bytes | None
    value: bytes
    malformed: str | None  # the kind, or None for a good event


def encode(event: dict[str, Any]) -> bytes:
    return orjson.dumps(event)


def corrupt(event: dict[str, Any], kind: str, rng: random.Random) -> bytes:
    bad = dict(event)
    if kind == "broken_json":
        text = encode(bad)
        return text[: rng.randrange(1, max(2, len(text) - 1))]
    if kind == "missing_field":
        del bad[rng.choice(["merchant_id", "amount", "currency", "approved_at", "version"])]
    elif kind == "wrong_type":
        field = rng.choice(["amount", "version", "canceled_amount"])
        bad[field] = bad[field] + 0.5 if field != "version" else str(bad[field])
    elif kind == "unknown_event_type":
        bad["event_type"] = rng.choice(["payment.refunded", "payment.APPROVED", "chargeback"])
    else:
        bad["approved_at"] = str(bad["approved_at"])[:19]  # drop the offset
    return encode(bad)


def with_malformed(
    events: Iterable[dict[str, Any]], rate: float, seed: int, key_field: str = "txn_id"
) -> Iterator[Wire]:
    """Yield every event; after a ``rate`` share of them, also a malformed variant."""
    rng = random.Random(seed ^ 0x5EED)
    for event in events:
        key = str(event.get(key_field, "")).encode() or None
        yield Wire(key, encode(event), None)
        if rate and rng.random() < rate:
            kind = rng.choice(KINDS)
            yield Wire(key, corrupt(event, kind, rng), kind)
