"""What one API process holds: a read-only store reader, the search index opened for
reading, the key store, the rate limit counters. Created once per worker process
(FastAPI lifespan)."""

from __future__ import annotations

from dataclasses import dataclass

from query_api.keys import KeyStore
from query_api.ratelimit import KeyRateLimit
from search import SearchIndex, open_index
from storage import OlapReader, open_reader
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry


@dataclass
class Services:
    settings: Settings
    registry: SpecRegistry
    spec: DatasourceSpec  # the datasource /v1 serves
    reader: OlapReader
    search: SearchIndex
    keys: KeyStore
    rate_limit: KeyRateLimit | None  # None: api.rate_limit is "off"

    @classmethod
    def open(cls, settings: Settings, registry: SpecRegistry) -> Services:
        spec = registry.get(settings.api.datasource)
        limit = settings.api.rate_limit
        return cls(
            settings=settings,
            registry=registry,
            spec=spec,
            reader=open_reader(settings, registry),
            search=open_index(settings, spec, readonly=True),
            keys=KeyStore(settings.keys_path),
            rate_limit=None if limit == "off" else KeyRateLimit(limit, settings.rate_limit_path),
        )

    def close(self) -> None:
        self.reader.close()
        self.search.close()
        self.keys.close()
        if self.rate_limit is not None:
            self.rate_limit.close()
