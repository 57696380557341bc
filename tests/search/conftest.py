"""Search fixtures: one OpenSearch-compatible server (osmem-server) per test session.

osmem-server is an in-memory, OpenSearch-compatible test server; each test writes
under its own index prefix, so tests never see each other's documents.

The elasticsearch 9 client sends ``application/vnd.elasticsearch+json;
compatible-with=9``, which OpenSearch-compatible servers refuse (406). Production code
keeps the client's default node; tests inject :class:`PlainJsonNode` (TEST ONLY),
which sends the same bytes as plain ``application/json`` / ``application/x-ndjson``.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from time import monotonic, sleep
from typing import Any

import pytest
from elastic_transport import HttpHeaders, Urllib3HttpNode
from elastic_transport._node import NodeApiResponse
from elastic_transport.client_utils import DEFAULT, DefaultType
from elasticsearch import Elasticsearch
from osmem_server import OsmemServer

from search.elastic_index import ElasticIndex
from search.opensearch_index import OpenSearchIndex
from tally.settings import SearchSettings, Settings
from tally.specs import DatasourceSpec
from tests.opensearch import OpenSearch

_COMPAT = re.compile(r"application/vnd\.elasticsearch\+([\w-]+)(\s*;\s*compatible-with=\d+)?")

Sent = tuple[str, str, dict[str, str]]  # method, target, headers (lower-case names)


class RecordingNode(Urllib3HttpNode):
    """The client's default node, remembering the last requests it sent (TEST ONLY)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: deque[Sent] = deque(maxlen=200)

    def rewrite(self, headers: HttpHeaders) -> HttpHeaders:
        return headers

    def perform_request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: HttpHeaders | None = None,
        request_timeout: DefaultType | float | None = DEFAULT,
    ) -> NodeApiResponse:
        sent = self.rewrite(headers.copy() if headers is not None else HttpHeaders())
        self.sent.append((method, target, {k.lower(): v for k, v in sent.items()}))
        return super().perform_request(
            method, target, body=body, headers=sent, request_timeout=request_timeout
        )


class PlainJsonNode(RecordingNode):
    """TEST ONLY: send plain JSON media types so OpenSearch-compatible servers accept them.

    The body bytes are unchanged (the client already serialized them as JSON/NDJSON);
    only the ``Accept`` and ``Content-Type`` headers lose the Elasticsearch vendor type.
    """

    def rewrite(self, headers: HttpHeaders) -> HttpHeaders:
        for name in ("accept", "content-type"):
            value = headers.get(name)
            if value is not None:
                headers[name] = _COMPAT.sub(r"application/\1", value)
        return headers


def sent_requests(index: ElasticIndex) -> list[Sent]:
    """Every request the index's client sent (through a RecordingNode), oldest first."""
    out: list[Sent] = []
    for node in index.client.transport.node_pool.all():
        assert isinstance(node, RecordingNode)
        out.extend(node.sent)
    return out


@pytest.fixture(scope="session")
def es_url() -> Iterator[str]:
    """A running osmem-server on a free 127.0.0.1 port, stopped after the session."""
    # Port 0: the server binds a free port itself and reports it (no bind race).
    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False, startup_timeout=30.0)
    try:
        assert server.url.startswith("http://127.0.0.1:"), server.url
        deadline = monotonic() + 30.0
        while True:  # readiness: it announced its address; wait until it answers
            try:
                with urllib.request.urlopen(server.url + "/", timeout=2.0) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                if monotonic() > deadline:
                    raise
                sleep(0.05)
        yield server.url
    finally:
        server.close()


def es_settings(tmp: Path, url: str, prefix: str) -> Settings:
    return Settings(
        data_dir=tmp,
        search=SearchSettings(backend="elasticsearch", url=url, index_prefix=prefix),
    )


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:16]}-"


MakeElastic = Callable[..., ElasticIndex]


@pytest.fixture
def make_elastic(
    es_url: str, payments_spec: DatasourceSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeElastic]:
    """Open ElasticIndex instances against osmem: ``make(prefix=None, spec=None)``.

    Each call without ``prefix`` gets a fresh prefix (fresh, empty indices); passing a
    prefix again opens the same indices, as another process would. Every instance is
    closed and every index deleted afterwards.
    """
    opened: list[ElasticIndex] = []
    tmp = tmp_path_factory.mktemp("es")

    def make(prefix: str | None = None, spec: DatasourceSpec | None = None) -> ElasticIndex:
        settings = es_settings(tmp, es_url, prefix or new_prefix())
        index = ElasticIndex(settings, spec or payments_spec, node_class=PlainJsonNode)
        opened.append(index)
        return index

    yield make
    names = sorted({name for index in opened for name in (index.index, index.meta_index)})
    for index in opened:
        index.close()
    admin = Elasticsearch(es_url, node_class=PlainJsonNode)
    try:
        for i in range(0, len(names), 50):
            admin.indices.delete(index=names[i : i + 50], ignore_unavailable=True)
    finally:
        admin.close()


MakeOpenSearch = Callable[..., OpenSearchIndex]
OPENSEARCH_SHARDS = 3  # more than one, so routing by tenant is exercised


def opensearch_settings(tmp: Path, url: str, prefix: str, **search: Any) -> Settings:
    fields = {"shards": OPENSEARCH_SHARDS, "replicas": 0, **search}
    return Settings(
        data_dir=tmp,
        search=SearchSettings(backend="opensearch", url=url, index_prefix=prefix, **fields),
    )


@pytest.fixture
def make_opensearch(
    opensearch: OpenSearch, payments_spec: DatasourceSpec, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeOpenSearch]:
    """Open OpenSearchIndex instances on the real OpenSearch: ``make(prefix=None,
    spec=None, **search_settings)``, as ``make_elastic`` does on osmem; three shards and
    no replicas unless told otherwise. Every index made is deleted afterwards."""
    opened: list[OpenSearchIndex] = []
    prefixes: set[str] = set()
    tmp = tmp_path_factory.mktemp("os")

    def make(
        prefix: str | None = None, spec: DatasourceSpec | None = None, **search: Any
    ) -> OpenSearchIndex:
        prefix = prefix or new_prefix()
        prefixes.add(prefix)
        settings = opensearch_settings(tmp, opensearch.url, prefix, **search)
        index = OpenSearchIndex(settings, spec or payments_spec)
        opened.append(index)
        return index

    yield make
    for index in opened:
        index.close()
    for prefix in sorted(prefixes):
        opensearch.delete(f"{prefix}*")
