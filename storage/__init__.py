"""OLAP storage backends behind one small contract (:mod:`storage.protocol`).

``open_store`` returns the writer side (commit, compactor, dead-letter outbox,
rebuild, repair) and ``open_reader`` the query side of the backend that
``settings.store.backend`` names. Each backend is a package (``storage/<name>/``)
whose module is a :class:`~storage.protocol.Backend`; engine differences live in
its :class:`~storage.protocol.Capabilities`, never in ``if engine == ...``. Adding
a backend is adding its folder and one line to ``BACKENDS``.
"""

from __future__ import annotations

import importlib
from typing import cast

from storage.protocol import (
    Backend,
    Capabilities,
    CommitResult,
    CompactionResult,
    Compactor,
    DeadLetterOutbox,
    DeadLetterRecord,
    OffsetRange,
    OlapReader,
    OlapStore,
    QueryResult,
    StoredPosition,
)
from tally.errors import ConfigError
from tally.settings import Settings
from tally.specs import SpecRegistry

BACKENDS = {
    "embedded": "storage.embedded",
    "druid": "storage.druid",
    "starrocks": "storage.starrocks",
}


def backend(name: str) -> Backend:
    """The backend package ``name`` (imported on first use: a process pays only for
    the engine it runs)."""
    try:
        module = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"store.backend: unknown backend {name!r} (known: {known})") from None
    return cast(Backend, importlib.import_module(module))


def open_store(settings: Settings, registry: SpecRegistry) -> OlapStore:
    return backend(settings.store.backend).open_store(settings, registry)


def open_reader(settings: Settings, registry: SpecRegistry) -> OlapReader:
    return backend(settings.store.backend).open_reader(settings, registry)


__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "CommitResult",
    "CompactionResult",
    "Compactor",
    "DeadLetterOutbox",
    "DeadLetterRecord",
    "OffsetRange",
    "OlapReader",
    "OlapStore",
    "QueryResult",
    "StoredPosition",
    "backend",
    "open_reader",
    "open_store",
]
