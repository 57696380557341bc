"""Embedded search: tantivy, one index shard per source Kafka partition.

All versions of an entity share its Kafka key, hence its partition, hence its shard:
the version guard is local to a shard, and two ingest processes that split the
partitions never contend for tantivy's single-writer lock. Searches fan out over
every shard and merge by score, like an Elasticsearch index with routing.

Searchable fields use a lowercase 2–3-gram analyzer, so any substring of two or
more characters — Korean included, which has no spaces inside words — finds its
documents. The OLAP store re-checks every candidate exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import tantivy

from search.analysis import CHARS_FIELD, MAX_GRAM, MIN_GRAM, grams, letters, single_letter
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
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tally.timeutil import from_micros, to_micros

ANALYZER = "tally_ngram"
CAPABILITIES = SearchCapabilities(
    "tantivy", external_versions=False, shards_by_source_partition=True
)
_WRITER_HEAP = 64 * 1024 * 1024
_JSON = msgspec.json.Encoder()
_MIN_I64, _MAX_I64 = -(2**63), 2**63 - 1


def analyzer() -> Any:
    """The analyzer for searchable fields (Elasticsearch mirrors it in its mapping)."""
    return (
        tantivy.TextAnalyzerBuilder(
            tantivy.Tokenizer.ngram(min_gram=MIN_GRAM, max_gram=MAX_GRAM, prefix_only=False)
        )
        .filter(tantivy.Filter.lowercase())
        .build()
    )


def _schema(spec: DatasourceSpec) -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("key", stored=True, tokenizer_name="raw")
    sb.add_text_field("tenant", stored=False, tokenizer_name="raw")
    sb.add_text_field("event_id", stored=True, tokenizer_name="raw", index_option="basic")
    sb.add_integer_field("version", stored=True, indexed=False, fast=True)
    # Microseconds since the epoch: tantivy's date fields keep whole seconds in their
    # index and fast columns, which would blur range edges and newest-first order.
    sb.add_integer_field("time_us", stored=True, indexed=True, fast=True)
    for name in spec.datasource.searchable:
        sb.add_text_field(name, stored=False, tokenizer_name=ANALYZER, index_option="basic")
    sb.add_text_field(CHARS_FIELD, stored=False, tokenizer_name="whitespace", index_option="basic")
    return sb.build()


class _Shard:
    def __init__(self, path: Path, schema: tantivy.Schema, *, writable: bool) -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.index = tantivy.Index(schema, path=str(path), reuse=True)
        except ValueError as exc:
            raise SearchError(f"cannot open search shard {path}: {exc}") from exc
        self.index.register_tokenizer(ANALYZER, analyzer())
        self.path = path
        self.writer: Any = None
        self._stamp: tuple[int, int, int] | None = None
        self._searcher: tantivy.Searcher | None = None
        if writable:
            try:
                self.writer = self.index.writer(heap_size=_WRITER_HEAP, num_threads=1)
            except ValueError as exc:  # LockBusy: another process writes this shard
                raise SearchUnavailable(f"search shard {path} is locked by another writer") from exc

    def searcher(self) -> tantivy.Searcher:
        """A searcher over the shard's last commit. tantivy rewrites ``meta.json`` (a
        new file) on every commit, so the index is reloaded only when that changed:
        a search costs no reload while nothing was written."""
        try:
            st = (self.path / "meta.json").stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        searcher = self._searcher
        if searcher is None or stamp is None or stamp != self._stamp:
            self.index.reload()
            searcher = self._searcher = self.index.searcher()
            self._stamp = stamp
        return searcher

    @property
    def meta_path(self) -> Path:
        return self.path / "tally-meta.json"

    def newest(self) -> datetime | None:
        try:
            value = json.loads(self.meta_path.read_text())["newest"]
        except (OSError, ValueError, KeyError):
            return None
        if value is None:
            return None
        newest = datetime.fromisoformat(value)
        if newest.tzinfo is None:  # broken data, never assumed UTC
            raise SearchError(f"{self.meta_path}: stored time {value!r} has no timezone")
        return newest


class TantivyIndex:
    capabilities = CAPABILITIES

    def __init__(self, settings: Settings, spec: DatasourceSpec, *, readonly: bool = False) -> None:
        self.spec = spec
        self.root = settings.data_dir / "search" / spec.name
        self.schema = _schema(spec)
        self.readonly = readonly
        self._writers: dict[int, _Shard] = {}
        self._readers: dict[str, _Shard] = {}
        self._lock = threading.Lock()

    # --- writing -----------------------------------------------------------------------

    def _shard(self, shard: int) -> _Shard:
        if self.readonly:
            raise SearchError("search index opened read-only")
        if shard not in self._writers:
            self._writers[shard] = _Shard(self.root / f"p{shard}", self.schema, writable=True)
        return self._writers[shard]

    def _docs(self, shard: _Shard, keys: Sequence[str]) -> Iterator[Any]:
        """The shard's stored documents for ``keys``, as of its last commit."""
        searcher = shard.searcher()
        query = tantivy.Query.term_set_query(self.schema, "key", list(keys))
        for _score, address in searcher.search(query, limit=max(1, len(keys) * 2)).hits:
            yield searcher.doc(address)

    def _stored(self, shard: _Shard, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
        return {
            _get(doc, "key"): (_get(doc, "version"), _get(doc, "event_id"))
            for doc in self._docs(shard, keys)
        }

    def upsert(self, shard: int, docs: Sequence[Doc]) -> UpsertResult:
        require_aware_docs(docs)
        target = self._shard(shard)
        latest = newest_per_key(docs)
        stored = self._stored(target, list(latest))
        written = 0
        try:
            for key, doc in latest.items():
                old = stored.get(key)
                if old is not None and old >= (doc.version, doc.event_id):
                    continue
                if old is not None:
                    target.writer.delete_documents_by_term("key", key)
                _add(target, doc)
                written += 1
        except ValueError as exc:
            raise SearchError(f"tantivy rejected a document: {exc}") from exc
        return UpsertResult(written, len(docs) - written)

    def replace(self, shard: int, docs: Sequence[Doc]) -> ReplaceResult:
        """Delete the keys' documents from every shard holding them, add ``docs`` to
        ``shard``, commit. Shard writers opened for this are released afterwards; one a
        running search ingester holds is refused (SearchUnavailable: stop it first)."""
        require_aware_docs(docs)
        latest = newest_per_key(docs)
        opened = set(self._writers)
        touched = self._forget(list(latest))[1] | {shard}
        try:
            for doc in latest.values():
                _add(self._shard(shard), doc)
        except ValueError as exc:
            raise SearchError(f"tantivy rejected a document: {exc}") from exc
        self._commit_release(touched, opened)
        return ReplaceResult(len(latest), {})

    def delete(self, keys: Sequence[str]) -> int:
        opened = set(self._writers)
        removed, touched = self._forget(keys)
        self._commit_release(touched, opened)
        return removed

    def _forget(self, keys: Sequence[str]) -> tuple[int, set[int]]:
        """Delete (uncommitted) ``keys`` in every shard that holds them."""
        removed = 0
        touched: set[int] = set()
        for reader in self._reader_shards():
            found = self._stored(reader, keys)
            if not found:
                continue
            number = int(reader.path.name.removeprefix("p"))
            writer = self._shard(number).writer
            for key in found:
                writer.delete_documents_by_term("key", key)
            removed += len(found)
            touched.add(number)
        return removed, touched

    def _commit_release(self, shards: set[int], keep: set[int]) -> None:
        for number in sorted(shards):
            self.commit(number, None)
            if number not in keep:
                self.release(number)

    def commit(self, shard: int, newest: datetime | None) -> None:
        if newest is not None:
            require_aware_time(newest, "freshness watermark")
        target = self._shard(shard)
        try:
            target.writer.commit()
        except (ValueError, OSError) as exc:
            raise SearchUnavailable(f"tantivy commit failed: {exc}") from exc
        previous = target.newest()
        if newest is not None and (previous is None or newest > previous):
            tmp = target.meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"newest": newest.isoformat()}))
            os.replace(tmp, target.meta_path)

    def release(self, shard: int) -> None:
        target = self._writers.pop(shard, None)
        if target is not None and target.writer is not None:
            with contextlib.suppress(ValueError):
                target.writer.rollback()
            target.writer = None  # dropping the writer releases tantivy's lock

    # --- reading -------------------------------------------------------------------------

    def _reader_shards(self) -> list[_Shard]:
        with self._lock:
            if self.root.exists():
                for path in sorted(self.root.glob("p*")):
                    if path.name not in self._readers and (path / "meta.json").exists():
                        self._readers[path.name] = _Shard(path, self.schema, writable=False)
            return list(self._readers.values())

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
        query = self._query(tenant, text, start, end)
        # Each shard ranks its own top ``limit`` (by score, or newest first by the
        # time_us fast column); stored documents are fetched only for the global top.
        ranked: list[tuple[float, int, Any]] = []
        searchers: list[tantivy.Searcher] = []
        for shard in self._reader_shards():
            searcher = shard.searcher()
            field = "time_us" if order == "time" else None
            result = searcher.search(query, limit=limit, count=False, order_by_field=field)
            ranked += [(value, len(searchers), address) for value, address in result.hits]
            searchers.append(searcher)
        ranked.sort(key=lambda r: r[0], reverse=True)
        if len(ranked) > limit:
            cut = ranked[limit - 1][0]
            # Ties at the cut are all fetched: the final order breaks them by key.
            ranked = [r for r in ranked if r[0] >= cut] if order == "score" else ranked[:limit]
        hits = []
        for value, i, address in ranked:
            doc = searchers[i].doc(address)
            score = 0.0 if order == "time" else float(value)
            hits.append(Hit(_get(doc, "key"), from_micros(_get(doc, "time_us")), score))
        if order == "time":
            hits.sort(key=lambda h: (h.time, h.key), reverse=True)
        else:
            hits.sort(key=lambda h: (-h.score, h.key))
        return hits[:limit]

    def _query(
        self, tenant: str, text: str, start: datetime | None, end: datetime | None
    ) -> tantivy.Query:
        occur = tantivy.Occur
        clauses: list[tuple[Any, Any]] = [
            (occur.Must, tantivy.Query.term_query(self.schema, "tenant", tenant))
        ]
        if start is not None or end is not None:
            clauses.append(
                (
                    occur.Must,
                    tantivy.Query.range_query(
                        self.schema,
                        "time_us",
                        tantivy.FieldType.Integer,
                        _MIN_I64 if start is None else to_micros(start),
                        _MAX_I64 if end is None else to_micros(end),
                        include_lower=True,
                        include_upper=False,
                    ),
                )
            )
        needed = grams(text)
        if needed:
            per_field = [
                (
                    occur.Should,
                    tantivy.Query.boolean_query(
                        [(occur.Must, tantivy.Query.term_query(self.schema, f, g)) for g in needed]
                    ),
                )
                for f in self.spec.datasource.searchable
            ]
            clauses.append((occur.Must, tantivy.Query.boolean_query(per_field)))
        elif letter := single_letter(text):
            clauses.append((occur.Must, tantivy.Query.term_query(self.schema, CHARS_FIELD, letter)))
        return tantivy.Query.boolean_query(clauses)

    def locate(self, keys: Sequence[str]) -> dict[str, datetime]:
        if not keys:
            return {}
        return {
            _get(doc, "key"): from_micros(_get(doc, "time_us"))
            for shard in self._reader_shards()
            for doc in self._docs(shard, keys)
        }

    def versions(self, keys: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for shard in self._reader_shards():
            for key, (version, _eid) in self._stored(shard, keys).items():
                out[key] = max(version, out.get(key, 0))
        return out

    def all_versions(self) -> dict[str, tuple[int, str]]:
        """Every (key → version, event_id); for verification and tests, not hot paths."""
        out: dict[str, tuple[int, str]] = {}
        for shard in self._reader_shards():
            searcher = shard.searcher()
            n = searcher.num_docs
            if not n:
                continue
            for _score, address in searcher.search(tantivy.Query.all_query(), limit=n).hits:
                doc = searcher.doc(address)
                out[_get(doc, "key")] = (_get(doc, "version"), _get(doc, "event_id"))
        return out

    def freshness(self) -> datetime | None:
        newest = [n for s in self._reader_shards() if (n := s.newest()) is not None]
        return max(newest) if newest else None

    def close(self) -> None:
        for shard in list(self._writers):
            self.release(shard)
        self._readers.clear()


def _add(shard: _Shard, doc: Doc) -> None:
    fields: dict[str, Any] = {
        "key": doc.key,
        "tenant": doc.tenant,
        "event_id": doc.event_id,
        "version": doc.version,
        "time_us": to_micros(doc.time),
    }
    for name, value in doc.text.items():
        if value:
            fields[name] = value
    if chars := letters(doc.text.values()):
        fields[CHARS_FIELD] = " ".join(chars)
    # JSON is the cheapest way in: msgspec writes it in C, and tantivy parses it in
    # Rust; Document(**fields) costs twice that.
    shard.writer.add_json(_JSON.encode(fields).decode())


def _get(doc: Any, name: str) -> Any:
    """A stored field's value (tantivy's stubs type it Optional; ours are required)."""
    return doc.get_first(name)
