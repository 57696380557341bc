"""What each sink must end up holding, computed naively from what was published."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, with_malformed
from tally.specs import DatasourceSpec
from tests.factories import latest_by_key


@dataclass
class Published:
    wires: list[Wire]
    good: list[dict[str, Any]]  # decoded good events, times as datetimes
    malformed: Counter[bytes]  # value → how many times it was published


def build(config: GeneratorConfig, malformed_rate: float) -> Published:
    return published(list(with_malformed(generate_events(config), malformed_rate, config.seed)))


def published(wires: list[Wire]) -> Published:
    """The reference of what ``wires`` hold (also for a stream cut short)."""
    good = []
    bad: Counter[bytes] = Counter()
    for wire in wires:
        if wire.malformed is None:
            event = orjson.loads(wire.value)
            for f in ("occurred_at", "approved_at"):
                event[f] = datetime.fromisoformat(event[f])
            good.append(event)
        else:
            bad[wire.value] += 1
    return Published(wires, good, bad)


def expected_rows(spec: DatasourceSpec, published: Published) -> dict[str, tuple[Any, ...]]:
    latest = latest_by_key(spec, published.good)
    return {
        k: (r["version"], r["event_id"], r["status"], r["canceled_amount"])
        for k, r in latest.items()
    }
