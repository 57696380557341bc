"""What Elasticsearch and OpenSearch share: the index contract as HTTP requests.

Both engines speak the same REST API for everything Tally needs (bulk with external
versions and routing, search with ``search_after``, refresh, index creation). So the
whole request and response logic lives here, and each backend (``elastic_index``,
``opensearch_index``) adds only its client: how a request is sent, how the client's
exceptions read, and its :class:`~search.protocol.SearchCapabilities`.

Every version of an entity is indexed with ``_id`` = its key and
``version_type=external`` carrying the event's version, so the engine itself enforces
"an older version never overwrites a newer one", across processes, batches and
retries, without a read-before-write.

**Routing by tenant** (``capabilities.routes_by_tenant``): a document is stored on the
shard its tenant hashes to, and a search (always for one tenant) asks that shard
alone, so a search costs one shard whatever the cluster's size. The price: a key alone
does not say where its document is, so lookups by key (``locate``, ``versions``,
``delete``) are ``ids`` searches over every shard, after a refresh of this process's
own writes. A key's tenant is taken to be fixed (a payment's merchant never changes);
were it to change, the old tenant's shard would keep a stale copy, which only ever
proposes a candidate that the OLAP store then rejects by tenant.

Searchable fields are cut by the same analyzer as the embedded backend: 2-3-grams over
every character (whitespace and punctuation included, like tantivy's ngram tokenizer),
then lowercase. Queries are built from the same :func:`~search.analysis.grams` as
exact ``term`` queries, so every backend finds the same documents for the same text.

``time_us`` (epoch microseconds, a ``long``) is what range filters and newest-first
order use: exact, where a ``date`` would compare milliseconds. ``time`` is kept as a
``date`` for people reading the index.

The freshness watermark lives in a small shared ``<prefix>meta-freshness`` index, one
document per datasource whose external version is the watermark in epoch
microseconds: the engine keeps the greatest one, whichever process writes last.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

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
from tally.errors import SearchError, SearchUnavailable
from tally.settings import SearchSettings, Settings
from tally.specs import DatasourceSpec
from tally.timeutil import from_micros, to_micros

ANALYZER = "tally_ngram"
META_SUFFIX = "meta-freshness"  # datasource names cannot contain "-": never collides
_BULK_DOCS = 1000  # documents per bulk request
_PAGE = 1000  # keys per lookup / all_versions round trip


class Refused(SearchError):
    """The engine answered a request with a 4xx: terminal. ``status`` and
    ``error_type`` (``index_not_found_exception``...) say what it refused."""

    def __init__(self, message: str, status: int, error_type: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class Overloaded(SearchUnavailable):
    """The engine answered 429 or 5xx: transient."""


def index_settings(cfg: SearchSettings) -> dict[str, Any]:
    index: dict[str, Any] = {
        "max_ngram_diff": 1,
        "number_of_shards": cfg.shards,
        "refresh_interval": f"{cfg.refresh_interval_s:g}s" if cfg.refresh_interval_s else "-1",
        "max_result_window": cfg.max_result_window,
    }
    if cfg.replicas is not None:
        index["number_of_replicas"] = cfg.replicas
    return {
        "index": index,
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


def search_body(
    spec: DatasourceSpec,
    tenant: str,
    text: str,
    start: datetime | None,
    end: datetime | None,
    order: SearchOrder,
) -> dict[str, Any]:
    """The query and sort of one search (without size and ``search_after``)."""
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
            for field in spec.datasource.searchable
        ]
        query["must"] = [{"bool": {"should": per_field, "minimum_should_match": 1}}]
    elif letter := single_letter(text):
        query["must"] = [{"term": {CHARS_FIELD: letter}}]
    sort: list[dict[str, Any]] = (
        [{"time_us": {"order": "desc"}}, {"key": {"order": "desc"}}]
        if order == "time"
        else [{"_score": {"order": "desc"}}, {"key": {"order": "asc"}}]
    )
    return {"query": {"bool": query}, "sort": sort, "_source": ["time_us"]}


def source_of(doc: Doc) -> dict[str, Any]:
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
    return source


class ClusterIndex(ABC):
    """The :class:`~search.protocol.SearchIndex` contract on a search cluster; a
    subclass supplies the client (:meth:`_send`, :meth:`close`) and capabilities."""

    capabilities: SearchCapabilities
    product: str  # how errors name the engine

    def __init__(self, settings: Settings, spec: DatasourceSpec) -> None:
        self.cfg = settings.search
        self.spec = spec
        self.index = self.cfg.index_prefix + spec.name
        self.meta_index = self.cfg.index_prefix + META_SUFFIX
        self.window = self.cfg.max_result_window  # hits per search request at most
        self._lock = threading.Lock()
        self._ready = False  # data and meta indices exist with our mappings
        self._dirty = False  # written since the last refresh
        self._recorded: datetime | None = None  # greatest watermark this process wrote

    # --- the client ----------------------------------------------------------------------

    @abstractmethod
    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        lines: list[dict[str, Any]] | None = None,
    ) -> tuple[int, Any]:
        """Send one request (``lines``: an NDJSON body); return the HTTP status and the
        decoded body whatever the status. Raise SearchUnavailable when the engine cannot
        be reached, SearchError for what retrying cannot fix (TLS, unreadable reply)."""

    @abstractmethod
    def close(self) -> None: ...

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        lines: list[dict[str, Any]] | None = None,
    ) -> Any:
        """A request whose non-2xx answer is raised: 429/5xx as Overloaded (transient),
        the rest as Refused (terminal)."""
        status, reply = self._send(method, path, params=params, body=body, lines=lines)
        if 200 <= status < 300:
            return reply
        error = reply.get("error") if isinstance(reply, dict) else reply
        reason = _reason(error, status)
        if status == 429 or status >= 500:
            raise Overloaded(f"{what}: {reason}")
        raise Refused(f"{what}: {reason}", status, _error_type(reply))

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
            what = f"create search index {self.index}"
            # The spec's template, stored in the cluster (renewed on every start, so a
            # newer spec's fields are in it): an index an operator recreates under this
            # name (a restore, a reindex) gets the analyzer and mappings, not dynamic ones.
            template = {
                "index_patterns": [self.index],
                "priority": 100,
                "template": _index_body(index_settings(self.cfg), properties),
                "_meta": {"tally_datasource": self.spec.name, "spec": self.spec.source},
            }
            self._call(what, "PUT", f"/_index_template/{self.index}", body=template)
            if not self._create(what, self.index, index_settings(self.cfg), properties):
                # Existing index: add fields a newer spec made searchable. Identical
                # definitions are a no-op; conflicting ones are refused (SearchError:
                # the index must be rebuilt under a new prefix).
                self._call(what, "PUT", f"/{self.index}/_mapping", body={"properties": properties})
            meta = {"datasource": {"type": "keyword"}, "newest": {"type": "date"}}
            meta_settings = {"index": {"number_of_shards": 1}}
            if self.cfg.replicas is not None:
                meta_settings["index"]["number_of_replicas"] = self.cfg.replicas
            self._create(what, self.meta_index, meta_settings, meta)
            self._ready = True

    def _create(
        self, what: str, name: str, settings: dict[str, Any], properties: dict[str, Any]
    ) -> bool:
        body = _index_body(settings, properties)
        try:
            self._call(what, "PUT", f"/{name}", body=body)
        except Refused as exc:
            if exc.error_type == "resource_already_exists_exception":
                return False  # another process (or an earlier run) made it
            raise
        return True

    # --- writing -------------------------------------------------------------------------

    def upsert(self, shard: int, docs: Sequence[Doc]) -> UpsertResult:
        """Index the newest doc per key; the engine refuses any not newer than stored.

        With external versions the engine accepts a write only if its version is
        strictly greater than the stored one; refusals (409) are counted as stale. So
        an *equal* version with a different event_id is refused: for exact version
        ties the first writer wins, unlike the OLAP store, which keeps the greatest
        event_id. That is harmless: both events carry the same version of the same
        entity, search only proposes the key, and the OLAP store supplies every field
        returned; at worst the searchable text of the tie loser is what finds it.
        Within one batch the tie is broken like the OLAP store (greatest event_id).

        ``shard`` is accepted for the protocol; the engine places documents itself.
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
        indexed again, which the engine refuses until ``index.gc_deletes`` (60 s by
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
                key: f"a newer version was deleted; {self.product} takes an older one only"
                " after index.gc_deletes (60 s by default): repair again then"
                for key in self._bulk(again, "external")
            }
        self._refresh()
        return ReplaceResult(len(latest) - len(refused), refused)

    def delete(self, keys: Sequence[str]) -> int:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return 0
        self._ensure_indices()
        stored = self._found(unique, ["tenant"])  # where each is stored
        removed = 0
        for i in range(0, len(stored), _BULK_DOCS):
            lines = [
                {"delete": {"_id": hit["_id"], **self._routing(hit["_source"]["tenant"])}}
                for hit in stored[i : i + _BULK_DOCS]
            ]
            self._dirty = True
            response = self._call(
                f"bulk delete in {self.index}", "POST", f"/{self.index}/_bulk", lines=lines
            )
            for item in response.get("items", []):
                result = next(iter(item.values()))
                status = int(result.get("status", 500))
                if 200 <= status < 300:
                    removed += 1
                elif status != 404:  # 404: removed meanwhile
                    cls = SearchUnavailable if status == 429 or status >= 500 else SearchError
                    reason = _reason(result.get("error"), status)
                    raise cls(
                        f"{self.product} could not remove documents of {self.index}: {reason}"
                    )
        self._refresh()
        return removed

    def _routing(self, tenant: str) -> dict[str, str]:
        return {"routing": tenant} if self.capabilities.routes_by_tenant else {}

    def _refresh(self) -> None:
        if self._dirty:
            self._call(f"refresh {self.index}", "POST", f"/{self.index}/_refresh")
            self._dirty = False

    def _bulk(self, docs: Sequence[Doc], version_type: str = "external") -> list[str]:
        """Index ``docs``; return the keys refused by the version guard (409)."""
        lines: list[dict[str, Any]] = []
        for doc in docs:
            action = {"_id": doc.key, "version": doc.version, "version_type": version_type}
            lines.append({"index": action | self._routing(doc.tenant)})
            lines.append(source_of(doc))
        self._dirty = True  # even a failed bulk may have written some items
        response = self._call(
            f"bulk write to {self.index}", "POST", f"/{self.index}/_bulk", lines=lines
        )
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
            raise SearchError(f"{self.product} rejected a document in {self.index}: {terminal}")
        if transient is not None:
            # Retrying the batch is safe: what was written is refused as stale (409).
            raise SearchUnavailable(f"{self.product} could not write to {self.index}: {transient}")
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
            self._call(
                f"record freshness in {self.meta_index}",
                "PUT",
                f"/{self.meta_index}/_doc/{self.spec.name}",
                params={"version": micros, "version_type": "external"},
                body={"datasource": self.spec.name, "newest": _iso(newest)},
            )
        except Refused as exc:
            if exc.status != 409:
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
        body = search_body(self.spec, tenant, text, start, end, order)
        # One request up to the result window; beyond it, page with search_after (by
        # score, a refresh between pages may shift scores: these are candidates only).
        hits: list[Hit] = []
        seen: set[str] = set()
        after: list[Any] | None = None
        while len(hits) < limit:
            size = min(self.window, limit - len(hits))
            page = self._search_page(
                body | {"size": size} | ({"search_after": after} if after else {}),
                self._routing(tenant),
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

    def _search_page(
        self, body: dict[str, Any], params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        try:
            reply = self._call(
                f"search {self.index}",
                "POST",
                f"/{self.index}/_search",
                params={"track_total_hits": "false", **(params or {})},
                body=body,
            )
        except Refused as exc:
            if exc.error_type == "index_not_found_exception":
                return []  # nothing written yet
            raise
        hits: list[dict[str, Any]] = reply["hits"]["hits"]
        return hits

    def locate(self, keys: Sequence[str]) -> dict[str, datetime]:
        return {
            hit["_id"]: from_micros(int(hit["_source"]["time_us"]))
            for hit in self._found(keys, ["time_us"])
        }

    def versions(self, keys: Sequence[str]) -> dict[str, int]:
        return {hit["_id"]: int(hit["_version"]) for hit in self._found(keys, [])}

    def _found(self, keys: Sequence[str], fields: list[str]) -> list[dict[str, Any]]:
        """The stored documents among ``keys``, with ``_version`` and ``fields`` of
        their source: an ``ids`` search in pages over every shard (a key alone does not
        say which shard holds it), after this process's own writes are refreshed."""
        unique = list(dict.fromkeys(keys))
        if unique and self._ready:
            self._refresh()
        out: list[dict[str, Any]] = []
        for i in range(0, len(unique), _PAGE):
            ids = unique[i : i + _PAGE]
            out += self._search_page(
                {
                    "query": {"ids": {"values": ids}},
                    "size": len(ids),
                    "version": True,
                    "_source": fields or False,
                }
            )
        return out

    def all_versions(self) -> dict[str, tuple[int, str]]:
        """Every (key → version, event_id); for verification and tests, not hot paths.

        Pages with ``search_after`` on the unique key, so a key present throughout is
        listed exactly once even while writers run.
        """
        out: dict[str, tuple[int, str]] = {}
        after: list[Any] | None = None
        while True:
            body: dict[str, Any] = {
                "query": {"match_all": {}},
                "sort": [{"key": {"order": "asc"}}],
                "size": _PAGE,
                "_source": ["event_id"],
                "version": True,
            }
            page = self._search_page(body | ({"search_after": after} if after else {}))
            for h in page:
                out[h["_id"]] = (int(h["_version"]), h["_source"]["event_id"])
            if len(page) < _PAGE:
                return out
            after = page[-1]["sort"]

    def freshness(self) -> datetime | None:
        try:
            doc = self._call(
                f"read freshness from {self.meta_index}",
                "GET",
                f"/{self.meta_index}/_doc/{self.spec.name}",
            )
        except Refused as exc:
            if exc.status == 404:
                return None  # no commit yet (missing document or index)
            raise
        if not doc.get("found", True):
            return None
        return _parse_time(doc["_source"]["newest"], f"freshness in {self.meta_index}")


# --- helpers ---------------------------------------------------------------------------


def _index_body(settings: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    """Settings and strict mappings: a field the spec does not declare is refused."""
    return {"settings": settings, "mappings": {"dynamic": "strict", "properties": properties}}


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


def _iso(value: datetime) -> str:
    """``value`` (aware: checked on the way in) as RFC 3339 in UTC."""
    return value.astimezone(UTC).isoformat()


def _parse_time(value: str, what: str) -> datetime:
    """A stored time; one without a zone is broken data, never assumed UTC."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise SearchError(f"{what}: stored time {value!r} has no timezone")
    return parsed.astimezone(UTC)
