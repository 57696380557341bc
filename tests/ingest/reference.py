"""What each sink must end up holding, computed naively from what was published."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, with_malformed
from producers.settlements import generate_settlements
from tally.specs import DatasourceSpec
from tests.factories import latest_by_key, normalise


@dataclass
class Published:
    wires: list[Wire]
    good: list[dict[str, Any]]  # decoded good events, times as datetimes
    malformed: Counter[bytes]  # value → how many times it was published


def build(
    config: GeneratorConfig, malformed_rate: float, spec: DatasourceSpec | None = None
) -> Published:
    """Payments as generated; with ``spec`` (settlements) that datasource's events of them."""
    if spec is None:
        events = generate_events(config)
    else:
        events = iter(generate_settlements(generate_events(config)))
    return published(list(with_malformed(events, malformed_rate, config.seed, spec=spec)), spec)


def published(wires: list[Wire], spec: DatasourceSpec | None = None) -> Published:
    """The reference of what ``wires`` hold (also for a stream cut short), decoded as
    ``spec``'s events (payments' by default)."""
    times = ("occurred_at", "approved_at") if spec is None else spec.timestamps
    good = []
    bad: Counter[bytes] = Counter()
    for wire in wires:
        if wire.malformed is None:
            event = orjson.loads(wire.value)
            for f in times:
                event[f] = datetime.fromisoformat(event[f])
            good.append(event)
        else:
            bad[wire.value] += 1
    return Published(wires, good, bad)


def expected_rows(
    spec: DatasourceSpec, published: Published, columns: Sequence[str]
) -> dict[str, tuple[Any, ...]]:
    """Each key's latest version, as ``columns`` (times in UTC)."""
    latest = latest_by_key(spec, published.good)
    return {k: tuple(normalise(r.get(c)) for c in columns) for k, r in latest.items()}
