"""Production search: Elasticsearch, one index per datasource.

Every version of an entity is indexed with ``_id`` = its key and
``version_type=external`` carrying the event's version, so Elasticsearch itself
enforces "an older version never overwrites a newer one" — across processes, batches
and retries, without a read-before-write. Elasticsearch routes documents to its own
shards, so the Kafka partition (``shard``) is accepted and ignored.

Searchable fields use the same analyzer as the embedded backend: 2–3-grams over every
character (whitespace and punctuation included, like tantivy's ngram tokenizer), then
lowercase. Queries are built from the same :func:`~search.analysis.grams` as
exact ``term`` queries, so both backends find the same documents for the same text.

``time_us`` (epoch microseconds, a ``long``) is what range filters and newest-first
order use: exact, where a ``date`` would compare milliseconds. ``time`` is kept as a
``date`` for people reading the index.

The freshness watermark lives in a small shared ``<prefix>meta-freshness`` index, one
document per datasource whose external version is the watermark in epoch
microseconds: Elasticsearch keeps the greatest one, whichever process writes last.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from elastic_transport import BaseNode, ConnectionTimeout, TlsError
from elastic_transport import ConnectionError as TransportConnectionError
from elasticsearch import ApiError, Elasticsearch, SerializationError

from search.analysis import CHARS_FIELD, grams, letters, single_letter
from search.protocol import (
    Doc,
    Hit,
    ReplaceResult,
    SearchCapabilities,
    SearchOrder,
    UpsertResult,
    newest_per_key,
    require_aware_bounds,
    require_aware_docs,
    require_aware_time,
)
from tally.errors import ConfigError, SearchError, SearchUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tally.timeutil import from_micros, to_micros

ANALYZER = "tally_ngram"
CAPABILITIES = SearchCapabilities(
    "elasticsearch", external_versions=True, shards_by_source_partition=False
)
META_SUFFIX = "meta-freshness"  # datasource names cannot contain "-": never collides
_BULK_DOCS = 1000  # documents per bulk request
_PAGE = 1000  # keys per mget / all_versions round trip
_WINDOW = 10_000  # Elasticsearch's default index.max_result_window: hits per search request


def index_settings() -> dict[str, Any]:
    return {
        "index": {"max_ngram_diff": 1},
        "analysis": {
            "tokenizer": {
                ANALYZER: {
                    "type": "ngram",
                    "min_gram": 2,
                    "max_gram": 3,
                    # empty = every character, like tantivy's ngram tokenizer: a
                    # substring spanning a space or a hyphen still finds its document
                    "token_chars": [],
                }
            },
            "analyzer": {
                ANALYZER: {"type": "custom", "tokenizer": ANALYZER, "filter": ["lowercase"]}
            },
        },
    }


def index_properties(spec: DatasourceSpec) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "key": {"type": "keyword"},
        "tenant": {"type": "keyword"},
        "event_id": {"type": "keyword"},
        "version": {"type": "long"},
        "time": {"type": "date"},
        "time_us": {"type": "long"},
    }
    for name in spec.datasource.searchable:
        properties[name] = {"type": "text", "analyzer": ANALYZER, "index_options": "freqs"}
    properties[CHARS_FIELD] = {"type": "keyword"}
    return properties


class ElasticIndex:
    """The :class:`~search.protocol.SearchIndex` contract on Elasticsearch.

    ``node_class`` selects the HTTP node implementation of ``elastic_transport``
    (default: the client's own); tests use it to talk to OpenSearch-compatible servers.
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        settings: Settings,
        spec: DatasourceSpec,
        *,
        node_class: type[BaseNode] | None = None,
        request_timeout: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        cfg = settings.search
        self.spec = spec
        self.index = cfg.elasticsearch_index_prefix + spec.name
        self.meta_index = cfg.elasticsearch_index_prefix + META_SUFFIX
        kwargs: dict[str, Any] = {
            "request_timeout": request_timeout,
            "max_retries": max_retries,
            "retry_on_timeout": True,  # safe: every write is idempotent by version
        }
        if node_class is not None:
            kwargs["node_class"] = node_class
        if cfg.elasticsearch_user is not None:
            password = cfg.elasticsearch_password
            kwargs["basic_auth"] = (
                cfg.elasticsearch_user,
                password.get_secret_value() if password is not None else "",
            )
        hosts = [h.strip() for h in cfg.elasticsearch_url.split(",") if h.strip()]
        try:
            self.client = Elasticsearch(hosts, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"search.elasticsearch_url: {exc}") from exc
        self._lock = threading.Lock()
        self._ready = False  # data and meta indices exist with our mappings
        self._dirty = False  # written since the last refresh
        self._recorded: datetime | None = None  # greatest watermark this process wrote

    # --- setup ---------------------------------------------------------------------------

    def _ensure_indices(self) -> None:
        """Create the indices on first write; on an existing one, add new searchable fields.

        Never let a write auto-create an index: dynamic mappings would silently make
        every searchable field unsearchable by grams.
        """
        with self._lock:
            if self._ready:
                return
            properties = index_properties(self.spec)
            with _translate(f"create search index {self.index}"):
                if not self._create(self.index, index_settings(), properties):
                    # Existing index: add fields a newer spec made searchable. Identical
                    # definitions are a no-op; conflicting ones are refused (SearchError:
                    # the index must be rebuilt under a new prefix).
                    self.client.indices.put_mapping(index=self.index, properties=properties)
                meta = {"datasource": {"type": "keyword"}, "newest": {"type": "date"}}
                self._create(self.meta_index, {}, meta)
            self._ready = True

    def _create(self, name: str, settings: dict[str, Any], properties: dict[str, Any]) -> bool:
        try:
            self.client.indices.create(
                index=name,
                settings=settings,
                mappings={"dynamic": "strict", "properties": properties},
            )
        except ApiError as exc:
            if _error_type(exc.body) == "resource_already_exists_exception":
                return False  # another process (or an earlier run) made it
            raise
        return True

    # --- writing -------------------------------------------------------------------------

    def upsert(self, shard: int, docs: Sequence[Doc]) -> UpsertResult:
        """Index the newest doc per key; Elasticsearch refuses any not newer than stored.

        With external versions Elasticsearch accepts a write only if its version is
        strictly greater than the stored one; refusals (409) are counted as stale. So
        an *equal* version with a different event_id is refused: for exact version
        ties the first writer wins, unlike the OLAP store, which keeps the greatest
        event_id. That is harmless: both events carry the same version of the same
        entity, search only proposes the key, and the OLAP store supplies every field
        returned — at worst the searchable text of the tie loser is what finds it.
        Within one batch the tie is broken like the OLAP store (greatest event_id).

        ``shard`` is accepted for the protocol; Elasticsearch routes by ``_id`` itself.
        """
        require_aware_docs(docs)
        latest = newest_per_key(docs)
        if not latest:
            return UpsertResult(0, len(docs))
        self._ensure_indices()
        written = 0
        batch = list(latest.values())
        for i in range(0, len(batch), _BULK_DOCS):
            chunk = batch[i : i + _BULK_DOCS]
            written += len(chunk) - len(self._bulk(chunk))
        return UpsertResult(written, len(docs) - written)

    def replace(self, shard: int, docs: Sequence[Doc]) -> ReplaceResult:
        """``external_gte`` takes an equal or newer version (a damaged or stale doc). A
        stored *newer* version cannot be lowered in place: the doc is deleted, then
        indexed again — which Elasticsearch refuses until ``index.gc_deletes`` (60 s by
        default) has forgotten the deleted version. Such keys come back in ``refused``
        (their wrong doc is gone already); repairing again later completes them."""
        require_aware_docs(docs)
        latest = list(newest_per_key(docs).values())
        if not latest:
            return ReplaceResult(0, {})
        self._ensure_indices()
        newer = set(self._bulk(latest, "external_gte"))
        refused: dict[str, str] = {}
        if newer:
            self.delete(sorted(newer))
            again = [d for d in latest if d.key in newer]
            refused = {
                key: "a newer version was deleted; Elasticsearch takes an older one only after"
                " index.gc_deletes (60 s by default): repair again then"
                for key in self._bulk(again, "external")
            }
        self._refresh()
        return ReplaceResult(len(latest) - len(refused), refused)

    def delete(self, keys: Sequence[str]) -> int:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return 0
        self._ensure_indices()
        removed = 0
        for i in range(0, len(unique), _BULK_DOCS):
            operations = [{"delete": {"_id": key}} for key in unique[i : i + _BULK_DOCS]]
            self._dirty = True
            with _translate(f"bulk delete in {self.index}"):
                response = self.client.bulk(index=self.index, operations=operations).body
            for item in response.get("items", []):
                result = next(iter(item.values()))
                status = int(result.get("status", 500))
                if 200 <= status < 300:
                    removed += 1
                elif status != 404:  # 404: nothing stored under that key
                    cls = SearchUnavailable if status == 429 or status >= 500 else SearchError
                    reason = _reason(result.get("error"), status)
                    raise cls(f"Elasticsearch could not remove documents of {self.index}: {reason}")
        self._refresh()
        return removed

    def _refresh(self) -> None:
        if self._dirty:
            with _translate(f"refresh {self.index}"):
                self.client.indices.refresh(index=self.index)
            self._dirty = False

    def _bulk(self, docs: Sequence[Doc], version_type: str = "external") -> list[str]:
        """Index ``docs``; return the keys refused by the version guard (409)."""
        operations: list[dict[str, Any]] = []
        for doc in docs:
            operations.append(
                {"index": {"_id": doc.key, "version": doc.version, "version_type": version_type}}
            )
            source: dict[str, Any] = {
                "key": doc.key,
                "tenant": doc.tenant,
                "event_id": doc.event_id,
                "version": doc.version,
                "time": _iso(doc.time),
                "time_us": to_micros(doc.time),
            }
            for name, value in doc.text.items():
                if value:
                    source[name] = value
            if chars := letters(doc.text.values()):
                source[CHARS_FIELD] = chars
            operations.append(source)
        self._dirty = True  # even a failed bulk may have written some items
        with _translate(f"bulk write to {self.index}"):
            response = self.client.bulk(index=self.index, operations=operations).body
        conflicts: list[str] = []
        transient: str | None = None
        terminal: str | None = None
        for item in response.get("items", []):
            result = next(iter(item.values()))
            status = int(result.get("status", 500))
            if 200 <= status < 300:
                continue
            elif status == 409:
                conflicts.append(str(result.get("_id")))  # version guard: stored is newer
            elif status == 429 or status >= 500:
                transient = transient or _reason(result.get("error"), status)
            else:
                terminal = terminal or _reason(result.get("error"), status)
        if terminal is not None:
            raise SearchError(f"Elasticsearch rejected a document in {self.index}: {terminal}")
        if transient is not None:
            # Retrying the batch is safe: what was written is refused as stale (409).
            raise SearchUnavailable(f"Elasticsearch could not write to {self.index}: {transient}")
        return conflicts

    def commit(self, shard: int, newest: datetime | None) -> None:
        """Refresh (writes become searchable), then raise the freshness watermark."""
        if newest is not None:
            require_aware_time(newest, "freshness watermark")
        self._ensure_indices()
        self._refresh()
        if newest is None or (self._recorded is not None and newest <= self._recorded):
            return
        micros = max(0, to_micros(newest))
        try:
            with _translate(f"record freshness in {self.meta_index}"):
                self.client.index(
                    index=self.meta_index,
                    id=self.spec.name,
                    document={"datasource": self.spec.name, "newest": _iso(newest)},
                    version=micros,
                    version_type="external",
                )
        except SearchError as exc:
            if not isinstance(exc.__cause__, ApiError) or exc.__cause__.meta.status != 409:
                raise
            # 409: another writer already recorded a newer (or this) watermark
        self._recorded = newest

    def release(self, shard: int) -> None:
        return None  # nothing is held per shard

    # --- reading -------------------------------------------------------------------------

    def search(
        self,
        tenant: str,
        text: str,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 1000,
        order: SearchOrder = "score",
    ) -> list[Hit]:
        require_aware_bounds(start, end)
        if limit <= 0:
            return []
        filters: list[dict[str, Any]] = [{"term": {"tenant": tenant}}]
        if start is not None or end is not None:
            bounds: dict[str, int] = {}
            if start is not None:
                bounds["gte"] = to_micros(start)
            if end is not None:
                bounds["lt"] = to_micros(end)
            filters.append({"range": {"time_us": bounds}})
        query: dict[str, Any] = {"filter": filters}
        needed = grams(text)
        if needed:
            per_field = [
                {"bool": {"must": [{"term": {field: gram}} for gram in needed]}}
                for field in self.spec.datasource.searchable
            ]
            query["must"] = [{"bool": {"should": per_field, "minimum_should_match": 1}}]
        elif letter := single_letter(text):
            query["must"] = [{"term": {CHARS_FIELD: letter}}]
        sort: list[dict[str, Any]] = (
            [{"time_us": {"order": "desc"}}, {"key": {"order": "desc"}}]
            if order == "time"
            else [{"_score": {"order": "desc"}}, {"key": {"order": "asc"}}]
        )
        # One request up to the result window; beyond it, page with search_after (by
        # score, a refresh between pages may shift scores: these are candidates only).
        hits: list[Hit] = []
        seen: set[str] = set()
        after: list[Any] | None = None
        while len(hits) < limit:
            size = min(_WINDOW, limit - len(hits))
            page = self._search_page(
                query={"bool": query},
                sort=sort,
                size=size,
                search_after=after,
                source_includes=["time_us"],
            )
            fresh = [h for h in page if h["_id"] not in seen]
            for h in fresh:
                seen.add(h["_id"])
                score = 0.0 if order == "time" else float(h["_score"])
                hits.append(Hit(h["_id"], from_micros(int(h["_source"]["time_us"])), score))
            if len(page) < size or not fresh:
                break
            after = page[-1]["sort"]
        if order == "time":
            hits.sort(key=lambda h: (h.time, h.key), reverse=True)
        else:
            hits.sort(key=lambda h: (-h.score, h.key))
        return hits

    def _search_page(self, **kwargs: Any) -> list[dict[str, Any]]:
        try:
            with _translate(f"search {self.index}"):
                body = self.client.search(index=self.index, track_total_hits=False, **kwargs).body
        except SearchError as exc:
            if _missing_index(exc):
                return []  # nothing written yet
            raise
        hits: list[dict[str, Any]] = body["hits"]["hits"]
        return hits

    def locate(self, keys: Sequence[str]) -> dict[str, datetime]:
        return {
            doc["_id"]: from_micros(int(doc["_source"]["time_us"]))
            for doc in self._found(keys, source_includes=["time_us"])
        }

    def versions(self, keys: Sequence[str]) -> dict[str, int]:
        return {doc["_id"]: int(doc["_version"]) for doc in self._found(keys, source=False)}

    def _found(self, keys: Sequence[str], **source: Any) -> list[dict[str, Any]]:
        """The stored documents among ``keys`` (mget in pages); none before the index
        exists."""
        unique = list(dict.fromkeys(keys))
        out: list[dict[str, Any]] = []
        for i in range(0, len(unique), _PAGE):
            try:
                with _translate(f"mget from {self.index}"):
                    docs = self.client.mget(
                        index=self.index, ids=unique[i : i + _PAGE], **source
                    ).body["docs"]
            except SearchError as exc:
                if _missing_index(exc):
                    return []  # nothing written yet
                raise
            for doc in docs:
                if "error" in doc:
                    if _error_type(doc) == "index_not_found_exception":
                        return []
                    raise SearchError(f"mget from {self.index}: {_reason(doc['error'], 500)}")
                if doc.get("found"):
                    out.append(doc)
        return out

    def all_versions(self) -> dict[str, tuple[int, str]]:
        """Every (key → version, event_id); for verification and tests, not hot paths.

        Pages with ``search_after`` on the unique key, so a key present throughout is
        listed exactly once even while writers run.
        """
        out: dict[str, tuple[int, str]] = {}
        after: list[Any] | None = None
        while True:
            page = self._search_page(
                query={"match_all": {}},
                sort=[{"key": {"order": "asc"}}],
                size=_PAGE,
                search_after=after,
                source_includes=["event_id"],
                version=True,
            )
            for h in page:
                out[h["_id"]] = (int(h["_version"]), h["_source"]["event_id"])
            if len(page) < _PAGE:
                return out
            after = page[-1]["sort"]

    def freshness(self) -> datetime | None:
        try:
            with _translate(f"read freshness from {self.meta_index}"):
                doc = self.client.get(index=self.meta_index, id=self.spec.name).body
        except SearchError as exc:
            if isinstance(exc.__cause__, ApiError) and exc.__cause__.meta.status == 404:
                return None  # no commit yet (missing document or index)
            raise
        return _parse_time(doc["_source"]["newest"], f"freshness in {self.meta_index}")

    def close(self) -> None:
        self.client.close()


# --- boundary helpers ------------------------------------------------------------------


@contextmanager
def _translate(what: str) -> Iterator[None]:
    """Translate client errors: overload and outages are transient, the rest terminal."""
    try:
        yield
    except TlsError as exc:  # certificate or protocol setup: retrying will not fix it
        raise SearchError(f"{what}: TLS error: {exc}") from exc
    except (TransportConnectionError, ConnectionTimeout) as exc:
        raise SearchUnavailable(f"{what}: Elasticsearch unreachable: {exc}") from exc
    except ApiError as exc:
        status = exc.meta.status
        reason = _reason(exc.body.get("error") if isinstance(exc.body, dict) else None, status)
        if status == 429 or status >= 500:
            raise SearchUnavailable(f"{what}: {reason}") from exc
        raise SearchError(f"{what}: {reason}") from exc
    except SerializationError as exc:
        raise SearchError(f"{what}: unreadable response: {exc}") from exc


def _reason(error: Any, status: int) -> str:
    if isinstance(error, dict):
        kind = error.get("type", "error")
        reason = error.get("reason") or ""
        return f"{status} {kind}: {reason}".rstrip(": ")
    return f"{status} {error}" if error else f"status {status}"


def _error_type(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        kind = body["error"].get("type")
        return kind if isinstance(kind, str) else None
    return None


def _missing_index(exc: SearchError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, ApiError) and _error_type(cause.body) == "index_not_found_exception"


def _iso(value: datetime) -> str:
    """``value`` (aware: checked on the way in) as RFC 3339 in UTC."""
    return value.astimezone(UTC).isoformat()


def _parse_time(value: str, what: str) -> datetime:
    """A stored time; one without a zone is broken data, never assumed UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise SearchError(f"{what}: stored time {value!r} has no timezone")
    return parsed.astimezone(UTC)
