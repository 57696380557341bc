"""Elasticsearch-specific behaviour of ElasticIndex, against osmem-server.

What osmem cannot show, and how it is covered instead: it makes writes searchable
without a refresh, so commit's refresh is checked on the wire (the request is sent);
it never answers 429/5xx, so overload and outage classification is checked with a
TEST-ONLY node that returns canned responses.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from elastic_transport import ApiResponseMeta, BaseNode, HttpHeaders
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport._node import NodeApiResponse
from elastic_transport.client_utils import DEFAULT, DefaultType

import search.cluster as cluster
import search.elastic_index as elastic_index
from search.elastic_index import ElasticIndex
from search.protocol import Doc, UpsertResult
from search.tantivy_index import analyzer
from tally.errors import SearchError, SearchUnavailable, TallyError
from tally.specs import DatasourceSpec
from tests.search.conftest import (
    MakeElastic,
    PlainJsonNode,
    RecordingNode,
    es_settings,
    new_prefix,
    sent_requests,
)

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def doc(key: str, version: int = 1, *, event_id: str | None = None, **text: str | None) -> Doc:
    return Doc(
        key=key,
        tenant="m1",
        time=T0,
        version=version,
        event_id=event_id or f"{key}-v{version}",
        text=text or {"order_name": f"order {key} v{version}"},
    )


def test_index_is_named_by_prefix_and_created_with_explicit_mappings(
    make_elastic: MakeElastic, payments_spec: DatasourceSpec
) -> None:
    prefix = new_prefix()
    index = make_elastic(prefix=prefix)
    assert index.index == f"{prefix}payments"
    index.upsert(0, [doc("k1")])
    es = index.client
    mapping = es.indices.get_mapping(index=index.index).body[index.index]["mappings"]
    assert mapping["dynamic"] == "strict"
    props = mapping["properties"]
    assert {k: props[k]["type"] for k in ("key", "tenant", "event_id", "version", "time")} == {
        "key": "keyword",
        "tenant": "keyword",
        "event_id": "keyword",
        "version": "long",
        "time": "date",
    }
    for field in payments_spec.datasource.searchable:
        assert props[field]["type"] == "text"
        assert props[field]["analyzer"] == elastic_index.ANALYZER
    index_settings = es.indices.get_settings(index=index.index).body[index.index]["settings"]
    assert int(index_settings["index"]["max_ngram_diff"]) >= 1
    tokenizer = index_settings["index"]["analysis"]["tokenizer"][elastic_index.ANALYZER]
    assert (tokenizer["type"], int(tokenizer["min_gram"]), int(tokenizer["max_gram"])) == (
        "ngram",
        2,
        3,
    )


@pytest.mark.parametrize(
    "text", ["Coffee Beans", "아메리카노 두 잔", "ORDER-2026/03 #7", "Kim 민지", "a", "가나"]
)
def test_analyzer_emits_the_same_grams_as_tantivy(make_elastic: MakeElastic, text: str) -> None:
    index = make_elastic()
    index.upsert(0, [doc("k1")])  # creates the index and its analyzer
    tokens = index.client.indices.analyze(
        index=index.index, analyzer=elastic_index.ANALYZER, text=text
    ).body["tokens"]
    assert sorted(t["token"] for t in tokens) == sorted(analyzer().analyze(text))


def test_version_conflicts_409_are_counted_as_stale(make_elastic: MakeElastic) -> None:
    index = make_elastic()
    assert index.upsert(0, [doc("k1", 5), doc("k2", 1)]) == UpsertResult(2, 0)
    before = len(sent_requests(index))
    # no read before write: the only request is the bulk; the refusal is the server's 409
    assert index.upsert(3, [doc("k1", 4), doc("k2", 2)]) == UpsertResult(1, 1)
    sent = sent_requests(index)[before:]
    assert [(m, t.split("?")[0]) for m, t, _h in sent] == [("POST", f"/{index.index}/_bulk")]
    assert index.upsert(0, [doc("k1", 5, event_id="other")]) == UpsertResult(0, 1)  # equal
    # a retried batch that was already applied is all stale, not an error
    assert index.upsert(0, [doc("k1", 5), doc("k2", 2)]) == UpsertResult(0, 2)
    assert index.all_versions() == {"k1": (5, "k1-v5"), "k2": (2, "k2-v2")}


def test_other_item_errors_raise_a_terminal_search_error(make_elastic: MakeElastic) -> None:
    index = make_elastic()
    index.upsert(0, [doc("k1", 5)])
    with pytest.raises(SearchError) as caught:  # stale + a document the mapping refuses
        index.upsert(0, [doc("k1", 4), doc("k2", 1, not_a_field="x")])
    assert not caught.value.transient
    assert "strict_dynamic_mapping_exception" in caught.value.message
    assert not isinstance(caught.value, SearchUnavailable)


def test_invalid_index_prefix_is_a_terminal_error(
    make_elastic: MakeElastic, es_url: str, tmp_path: Path, payments_spec: DatasourceSpec
) -> None:
    settings = es_settings(tmp_path, es_url, "Upper-Case-")
    index = ElasticIndex(settings, payments_spec, node_class=PlainJsonNode)
    try:
        with pytest.raises(SearchError) as caught:
            index.upsert(0, [doc("k1")])
        assert not caught.value.transient
    finally:
        index.close()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there any more: connections are refused


OPERATIONS: dict[str, Callable[[ElasticIndex], object]] = {
    "upsert": lambda i: i.upsert(0, [doc("k1")]),
    "commit": lambda i: i.commit(0, T0),
    "search": lambda i: i.search("m1", "coffee"),
    "versions": lambda i: i.versions(["k1"]),
    "all_versions": lambda i: i.all_versions(),
    "freshness": lambda i: i.freshness(),
}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_unreachable_server_is_transient_and_quick(
    tmp_path: Path, payments_spec: DatasourceSpec, operation: str
) -> None:
    settings = es_settings(tmp_path, f"http://127.0.0.1:{closed_port()}", "tally-")
    index = ElasticIndex(settings, payments_spec)  # the production node class
    try:
        started = time.monotonic()
        with pytest.raises(SearchUnavailable) as caught:
            OPERATIONS[operation](index)
        assert time.monotonic() - started < 5.0
        assert caught.value.transient
        assert isinstance(caught.value.__cause__, TransportConnectionError)
    finally:
        index.close()


Route = Callable[[str, str], tuple[int, Any]]


def canned(route: Route) -> type[BaseNode]:
    """TEST ONLY: a node answering every request from ``route(method, path)``."""

    class CannedNode(BaseNode):
        def perform_request(
            self,
            method: str,
            target: str,
            body: bytes | None = None,
            headers: HttpHeaders | None = None,
            request_timeout: DefaultType | float | None = DEFAULT,
        ) -> NodeApiResponse:
            status, payload = route(method, target.split("?")[0])
            meta = ApiResponseMeta(
                status=status,
                http_version="1.1",
                headers=HttpHeaders(
                    {"content-type": "application/json", "x-elastic-product": "Elasticsearch"}
                ),
                duration=0.0,
                node=self.config,
            )
            return NodeApiResponse(meta, json.dumps(payload).encode())

    return CannedNode


def bulk_item(status: int, kind: str) -> dict[str, Any]:
    return {"index": {"_id": "k1", "status": status, "error": {"type": kind, "reason": kind}}}


@pytest.mark.parametrize(
    ("bulk_status", "bulk_body", "expected"),
    [
        (
            200,
            {"errors": True, "items": [bulk_item(429, "es_rejected_execution_exception")]},
            SearchUnavailable,
        ),
        (
            200,
            {"errors": True, "items": [bulk_item(503, "unavailable_shards_exception")]},
            SearchUnavailable,
        ),
        (200, {"errors": True, "items": [bulk_item(400, "mapper_parsing_exception")]}, SearchError),
        (
            429,
            {"error": {"type": "circuit_breaking_exception", "reason": "too big"}},
            SearchUnavailable,
        ),
        (
            503,
            {"error": {"type": "cluster_block_exception", "reason": "no master"}},
            SearchUnavailable,
        ),
        (401, {"error": {"type": "security_exception", "reason": "bad credentials"}}, SearchError),
        (200, {"errors": False, "items": [{"index": {"_id": "k1", "status": 201}}]}, None),
    ],
)
def test_overload_and_outage_are_transient_rejections_terminal(
    tmp_path: Path,
    payments_spec: DatasourceSpec,
    bulk_status: int,
    bulk_body: dict[str, Any],
    expected: type[TallyError] | None,
) -> None:
    def route(method: str, path: str) -> tuple[int, Any]:
        if path.endswith("/_bulk"):
            return bulk_status, bulk_body
        return 200, {"acknowledged": True}

    settings = es_settings(tmp_path, "http://127.0.0.1:9", "tally-")
    index = ElasticIndex(settings, payments_spec, node_class=canned(route))
    try:
        if expected is None:
            assert index.upsert(0, [doc("k1")]) == UpsertResult(1, 0)
            return
        with pytest.raises(expected) as caught:
            index.upsert(0, [doc("k1")])
        # a refusal is never transient, an overload never terminal (either may be a
        # subclass naming what the engine answered)
        assert not isinstance(
            caught.value, SearchError if expected is SearchUnavailable else SearchUnavailable
        )
        assert caught.value.transient == (expected is SearchUnavailable)
    finally:
        index.close()


def test_test_node_sends_plain_json(make_elastic: MakeElastic) -> None:
    index = make_elastic()
    index.upsert(0, [doc("k1")])
    index.commit(0, T0)
    index.search("m1", "order")
    sent = sent_requests(index)
    assert sent
    for method, target, headers in sent:
        assert headers.get("accept") == "application/json", (method, target)
        if target.split("?")[0].endswith("/_bulk"):
            assert headers["content-type"] == "application/x-ndjson"
        elif "content-type" in headers:
            assert headers["content-type"] == "application/json", (method, target)


def test_default_node_sends_compat_types_which_osmem_refuses(
    es_url: str, tmp_path: Path, payments_spec: DatasourceSpec
) -> None:
    """Why PlainJsonNode exists: the client's own media types, refused as a terminal error."""
    settings = es_settings(tmp_path, es_url, new_prefix())
    index = ElasticIndex(settings, payments_spec, node_class=RecordingNode)
    try:
        with pytest.raises(SearchError) as caught:
            index.upsert(0, [doc("k1")])
        assert not caught.value.transient
        assert "406" in caught.value.message
        _method, _target, headers = sent_requests(index)[0]
        assert headers["content-type"] == "application/vnd.elasticsearch+json; compatible-with=9"
    finally:
        index.close()


def test_commit_refreshes_after_writes(make_elastic: MakeElastic) -> None:
    index = make_elastic()

    def refreshes() -> int:
        path = f"/{index.index}/_refresh"
        return sum(1 for m, t, _h in sent_requests(index) if t.split("?")[0] == path)

    index.upsert(0, [doc("k1")])
    assert refreshes() == 0
    index.commit(0, T0)
    assert refreshes() == 1
    index.commit(0, T0)  # nothing written since: nothing to make searchable
    assert refreshes() == 1
    index.upsert(0, [doc("k1")])  # even an all-stale batch may follow a partial write
    index.commit(0, T0)
    assert refreshes() == 2


@pytest.fixture
def seven(make_elastic: MakeElastic) -> tuple[ElasticIndex, list[Doc]]:
    index = make_elastic()
    docs = [doc(f"k{i}", order_name="same text" + " text" * (i % 3)) for i in range(7)]
    index.upsert(0, docs)
    index.commit(0, T0)
    return index, docs


def test_search_up_to_the_result_window_is_one_request(
    seven: tuple[ElasticIndex, list[Doc]],
) -> None:
    index, _docs = seven
    before = len(sent_requests(index))
    full = index.search("m1", "text")
    top = index.search("m1", "text", limit=5)
    assert len(sent_requests(index)) - before == 2
    assert len(full) == 7
    assert top == full[:5]


@pytest.mark.xfail(
    reason="osmem gap: search_after is ignored when sorting by _score (the first page "
    "comes back again); paging beyond index.max_result_window is proven on a real "
    "OpenSearch instead (tests/search/test_opensearch.py), through the same requests",
    strict=True,
)
def test_search_pages_beyond_the_result_window(
    seven: tuple[ElasticIndex, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, _docs = seven
    full = index.search("m1", "text")
    monkeypatch.setattr(index, "window", 2)
    assert index.search("m1", "text") == full
    assert index.search("m1", "text", limit=5) == full[:5]


def test_versions_and_all_versions_page(
    seven: tuple[ElasticIndex, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    index, docs = seven
    monkeypatch.setattr(cluster, "_PAGE", 2)
    before = len(sent_requests(index))
    assert index.all_versions() == {d.key: (1, d.event_id) for d in docs}
    assert index.versions([d.key for d in docs]) == {d.key: 1 for d in docs}
    assert len(sent_requests(index)) - before == 4 + 4


def test_a_newly_searchable_field_is_added_to_an_existing_index(
    make_elastic: MakeElastic, payments_spec: DatasourceSpec
) -> None:
    prefix = new_prefix()
    make_elastic(prefix=prefix).upsert(0, [doc("k1", order_name="first")])
    ds = payments_spec.datasource
    wider = payments_spec.model_copy(
        update={
            "datasource": ds.model_copy(update={"searchable": (*ds.searchable, "card_company")})
        }
    )
    index = make_elastic(prefix=prefix, spec=wider)
    index.upsert(0, [doc("k2", order_name="second", card_company="SHINHAN")])
    index.commit(0, T0)
    assert [h.key for h in index.search("m1", "shinhan")] == ["k2"]
    assert {h.key for h in index.search("m1", "first")} == {"k1"}


_WITHOUT_TANTIVY = """
import sys
from importlib.abc import MetaPathFinder


class NoTantivy(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tantivy" or name.startswith("tantivy."):
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None


sys.meta_path.insert(0, NoTantivy())

from datetime import UTC, datetime
from pathlib import Path

from search import Doc, open_index
from search.elastic_index import ElasticIndex
from tally.settings import SearchSettings, Settings
from tally.specs import SpecRegistry, builtin_spec_paths
from tests.search.conftest import PlainJsonNode

url, prefix, data_dir = sys.argv[1:]
spec = SpecRegistry.load(builtin_spec_paths()).get("payments")
settings = Settings(
    data_dir=Path(data_dir),
    search=SearchSettings(
        backend="elasticsearch", url=url, index_prefix=prefix
    ),
)
opened = open_index(settings, spec)  # the factory path; the client connects lazily
assert isinstance(opened, ElasticIndex), type(opened)
opened.close()
index = ElasticIndex(settings, spec, node_class=PlainJsonNode)
t0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
doc = Doc("k1", "m1", t0, 1, "e1", {"order_name": "Coffee beans"})
assert index.upsert(0, [doc]).written == 1
index.commit(0, t0)
assert [h.key for h in index.search("m1", "coffee")] == ["k1"]
index.client.indices.delete(index=[index.index, index.meta_index])
index.close()
assert sys.modules.get("tantivy") is None
print("ok")
"""


def test_the_elasticsearch_backend_works_without_tantivy_installed(
    es_url: str, tmp_path: Path
) -> None:
    """Production search on Elasticsearch must not need the embedded engine's package."""
    root = Path(__file__).resolve().parents[2]
    ran = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TANTIVY, es_url, new_prefix(), str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (ran.returncode, ran.stdout.strip()) == (0, "ok"), ran.stderr
