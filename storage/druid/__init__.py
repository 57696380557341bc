"""The Druid backend (``store.backend = "druid"``): Druid ingests the base datasource
itself, with a Kafka supervisor over the refined topic Tally's relay writes (ADR 0004).

The writer side (``storage.druid.store``) commits by producing to that refined topic in
one Kafka transaction, as the relay does; what it cannot do is a capability. The
reader (``storage.druid.reader``) is Druid SQL on the broker, merged on read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.druid.capabilities import CAPABILITIES as capabilities
from tally.settings import Settings
from tally.specs import SpecRegistry

if TYPE_CHECKING:
    from storage.druid.reader import DruidReader
    from storage.druid.store import DruidStore


def open_store(settings: Settings, registry: SpecRegistry) -> DruidStore:
    from storage.druid.store import DruidStore

    return DruidStore(settings, registry)


def open_reader(settings: Settings, registry: SpecRegistry) -> DruidReader:
    from storage.druid.reader import DruidReader

    return DruidReader(settings, registry)


__all__ = ["capabilities", "open_reader", "open_store"]
