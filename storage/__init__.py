"""OLAP storage backends behind one small protocol.

``open_store`` returns the writer side (commit, compact, rebuild) and ``open_reader``
the query side for the backend the settings select. Engine differences live in each
backend's :class:`~storage.protocol.Capabilities`, never in ``if engine == ...``.
"""

from __future__ import annotations

from storage.protocol import (
    Capabilities,
    CommitResult,
    CompactionResult,
    OffsetRange,
    OlapReader,
    OlapStore,
    QueryResult,
)
from tally.settings import Settings
from tally.specs import SpecRegistry


def open_store(settings: Settings, registry: SpecRegistry) -> OlapStore:
    from storage.embedded.store import EmbeddedStore

    return EmbeddedStore(settings, registry)


def open_reader(settings: Settings, registry: SpecRegistry) -> OlapReader:
    from storage.embedded.reader import EmbeddedReader

    return EmbeddedReader(settings, registry)


__all__ = [
    "Capabilities",
    "CommitResult",
    "CompactionResult",
    "OffsetRange",
    "OlapReader",
    "OlapStore",
    "QueryResult",
    "open_reader",
    "open_store",
]
