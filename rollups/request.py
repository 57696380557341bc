"""An aggregate request, as the query API and the demo ask it of the router."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from tally.timeutil import Granularity


@dataclass(frozen=True)
class AggregateRequest:
    start: datetime  # inclusive, aware
    end: datetime  # exclusive, aware
    granularity: Granularity
    group_by: tuple[str, ...] = ()
    filters: Mapping[str, Sequence[str]] = field(default_factory=dict)
