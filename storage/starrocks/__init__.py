"""The StarRocks backend (``store.backend = "starrocks"``): a Primary Key table per
datasource and an Aggregate-key table per rollup, loaded by labelled Stream Loads
(``storage.starrocks.store``), read with SQL over the MySQL protocol
(``storage.starrocks.reader``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.starrocks.capabilities import CAPABILITIES as capabilities
from tally.settings import Settings
from tally.specs import SpecRegistry

if TYPE_CHECKING:
    from storage.starrocks.reader import StarRocksReader
    from storage.starrocks.store import StarRocksStore


def open_store(settings: Settings, registry: SpecRegistry) -> StarRocksStore:
    from storage.starrocks.store import StarRocksStore

    return StarRocksStore(settings, registry)


def open_reader(settings: Settings, registry: SpecRegistry) -> StarRocksReader:
    from storage.starrocks.reader import StarRocksReader

    return StarRocksReader(settings, registry)


__all__ = ["capabilities", "open_reader", "open_store"]
