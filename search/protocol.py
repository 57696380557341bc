"""The contract every search backend implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from tally.errors import InvalidArgument, InvalidRow
from tally.timeutil import require_aware

SearchOrder = Literal["score", "time"]


@dataclass(frozen=True)
class SearchCapabilities:
    name: str
    external_versions: bool  # the engine enforces "older never overwrites newer" itself
    shards_by_source_partition: bool  # one index shard per Kafka partition
    routes_by_tenant: bool = False  # a tenant's docs on its shard; a search asks it alone


@dataclass(frozen=True)
class Doc:
    key: str
    tenant: str
    time: datetime  # partition time, aware
    version: int
    event_id: str
    text: Mapping[str, str | None]  # searchable field → value


@dataclass(frozen=True)
class UpsertResult:
    written: int
    stale: int  # older or equal versions skipped by the version guard


@dataclass(frozen=True)
class ReplaceResult:
    replaced: int
    refused: Mapping[str, str]  # key → why the backend would not take its doc (yet)


@dataclass(frozen=True)
class Hit:
    key: str
    time: datetime
    score: float


def newest_per_key(docs: Sequence[Doc]) -> dict[str, Doc]:
    """The greatest (version, event_id) per key among ``docs``."""
    latest: dict[str, Doc] = {}
    for doc in docs:
        have = latest.get(doc.key)
        if have is None or (doc.version, doc.event_id) > (have.version, have.event_id):
            latest[doc.key] = doc
    return latest


def require_aware_time(value: datetime, what: str) -> None:
    """Refuse a naive time (a search bound, a watermark): which instant it means is
    unknowable, so no backend guesses UTC."""
    try:
        require_aware(value, what)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


def require_aware_bounds(start: datetime | None, end: datetime | None) -> None:
    """Refuse a naive search bound (InvalidArgument)."""
    for name, bound in (("start", start), ("end", end)):
        if bound is not None:
            require_aware_time(bound, f"search {name}")


def require_aware_docs(docs: Sequence[Doc]) -> None:
    """Refuse a batch holding a doc with a naive time, before any of it is written."""
    for doc in docs:
        try:
            require_aware(doc.time, f"time of search document {doc.key!r}")
        except ValueError as exc:
            raise InvalidRow(str(exc)) from exc


class SearchIndex(Protocol):
    """Times are timezone-aware: a doc with a naive time refuses its whole batch in
    upsert and replace (InvalidRow); a naive search bound or commit watermark is
    refused (InvalidArgument). None is ever taken to be UTC."""

    capabilities: SearchCapabilities

    def upsert(self, shard: int, docs: Sequence[Doc]) -> UpsertResult:
        """Write docs, never letting an older (version, event_id) replace a newer one."""
        ...

    def commit(self, shard: int, newest: datetime | None) -> None:
        """Make upserts durable and searchable; record the freshness watermark."""
        ...

    def release(self, shard: int) -> None:
        """Give up writing a shard (its Kafka partition moved to another process)."""
        ...

    def search(
        self,
        tenant: str,
        text: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 1000,
        order: SearchOrder = "score",
    ) -> list[Hit]:
        """Matches of ``text`` for ``tenant`` with time in [start, end).

        ``order="score"``: the ``limit`` best, ordered by (score desc, key).
        ``order="time"``: the ``limit`` newest, ordered by (time desc, key desc), times
        compared to the microsecond — so when ``limit`` hits come back, every match
        newer than the last one is among them (a caller pages by narrowing ``end``)."""
        ...

    def locate(self, keys: Sequence[str]) -> dict[str, datetime]:
        """Partition time per indexed key: lets a point lookup read one partition."""
        ...

    def versions(self, keys: Sequence[str]) -> dict[str, int]:
        """Stored version per key (for verification and tests)."""
        ...

    def all_versions(self) -> dict[str, tuple[int, str]]:
        """Every key → stored (version, event_id); for verification, not hot paths."""
        ...

    def replace(self, shard: int, docs: Sequence[Doc]) -> ReplaceResult:
        """Write ``docs`` as given and make them durable and searchable, bypassing the
        version guard: whatever is stored for their keys — an older, an equal or a newer
        version — is replaced. For repair (``tally verify --repair``), never ingestion."""
        ...

    def delete(self, keys: Sequence[str]) -> int:
        """Remove the documents of ``keys``, durably; return how many there were."""
        ...

    def freshness(self) -> datetime | None: ...

    def close(self) -> None: ...
