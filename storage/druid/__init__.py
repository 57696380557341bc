"""The Druid backend (``store.backend = "druid"``): Druid ingests the base datasource
itself, with a Kafka supervisor over the refined topic Tally's relay writes (ADR 0004).

Built so far: capabilities, supervisor specs (``tally druid specs|apply``) and the
ingestion path (``tally ingest --sink olap`` runs ``ingest.relay``, chosen by the
``ingests_from_kafka`` capability) and the reader (``storage.druid.reader``: Druid SQL
on the broker, merged on read). The writer side a store offers (commit, offsets,
statistics, compaction) is not built yet: opening it says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

from storage.druid.capabilities import CAPABILITIES as capabilities
from tally.errors import ConfigError
from tally.settings import Settings
from tally.specs import SpecRegistry

if TYPE_CHECKING:
    from storage.druid.reader import DruidReader


def _not_yet(what: str) -> NoReturn:
    raise ConfigError(
        f"store.backend = druid: the Druid {what} is not implemented yet (only"
        " `tally ingest --sink olap`, which relays to Druid's supervisor, and"
        " `tally druid specs|apply` and the reader work)"
    )


def open_store(settings: Settings, registry: SpecRegistry) -> NoReturn:
    _not_yet("store (commit, offsets, statistics, compaction)")


def open_reader(settings: Settings, registry: SpecRegistry) -> DruidReader:
    from storage.druid.reader import DruidReader

    return DruidReader(settings, registry)


__all__ = ["capabilities", "open_reader", "open_store"]
