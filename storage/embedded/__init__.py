"""The embedded engine: Parquet segments, a SQLite catalog, DuckDB for queries.

This module is the backend (:class:`storage.protocol.Backend`) the factory in
:mod:`storage` loads for ``store.backend = "embedded"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.embedded.capabilities import CAPABILITIES as capabilities

if TYPE_CHECKING:
    from storage.embedded.reader import EmbeddedReader
    from storage.embedded.store import EmbeddedStore
    from tally.settings import Settings
    from tally.specs import SpecRegistry


def open_store(settings: Settings, registry: SpecRegistry) -> EmbeddedStore:
    from storage.embedded.store import EmbeddedStore

    return EmbeddedStore(settings, registry)


def open_reader(settings: Settings, registry: SpecRegistry) -> EmbeddedReader:
    from storage.embedded.reader import EmbeddedReader

    return EmbeddedReader(settings, registry)


__all__ = ["capabilities", "open_reader", "open_store"]
