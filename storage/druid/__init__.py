"""The Druid backend (``store.backend = "druid"``): Druid ingests the base datasource
itself, with a Kafka supervisor over the refined topic Tally's relay writes (ADR 0003).

Built so far: capabilities, supervisor specs (``tally druid specs|apply``) and the
ingestion path (``tally ingest --sink olap`` runs ``ingest.relay``, chosen by the
``ingests_from_kafka`` capability). The writer side a store offers (commit, offsets,
statistics, compaction) and the reader are not built yet: opening them says so.
"""

from __future__ import annotations

from typing import NoReturn

from storage.druid.capabilities import CAPABILITIES as capabilities
from tally.errors import ConfigError
from tally.settings import Settings
from tally.specs import SpecRegistry


def _not_yet(what: str) -> NoReturn:
    raise ConfigError(
        f"store.backend = druid: the Druid {what} is not implemented yet (only"
        " `tally ingest --sink olap`, which relays to Druid's supervisor, and"
        " `tally druid specs|apply` work)"
    )


def open_store(settings: Settings, registry: SpecRegistry) -> NoReturn:
    _not_yet("store (commit, offsets, statistics, compaction)")


def open_reader(settings: Settings, registry: SpecRegistry) -> NoReturn:
    _not_yet("reader (queries, lookups, freshness)")


__all__ = ["capabilities", "open_reader", "open_store"]
