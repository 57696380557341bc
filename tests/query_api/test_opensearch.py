"""The query API with a real OpenSearch as the search index (``tally engines up
opensearch``; three shards, routing by tenant) beside the embedded store: the embedded
suites' route tests, hybrid search among them, imported and run here, where ``api`` is
the OpenSearch-backed server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tally.settings import SearchSettings, Settings
from tally.specs import SpecRegistry
from tests.ingest.conftest import env_for
from tests.opensearch import OpenSearch
from tests.query_api.conftest import Api, fill, serving
from tests.query_api.test_routes import (  # noqa: F401 (collected here, on OpenSearch)
    SEOUL_MIDNIGHT,
    test_a_cursor_belongs_to_its_query,
    test_hybrid_search_equals_a_brute_force_scan,
    test_no_request_to_any_route_returns_another_merchants_row,
    test_one_transaction_is_only_its_merchants,
    test_pages_cover_every_row_once_newest_first,
)
from tests.search.conftest import OPENSEARCH_SHARDS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(
    opensearch: OpenSearch, tmp_path_factory: pytest.TempPathFactory, registry: SpecRegistry
) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("api-opensearch")
    prefix = f"a{uuid.uuid4().hex[:12]}-"
    search = SearchSettings(
        backend="opensearch",
        url=opensearch.url,
        index_prefix=prefix,
        shards=OPENSEARCH_SHARDS,
        replicas=0,
    )
    settings = Settings(data_dir=data_dir, search=search)
    spec = registry.get("payments")
    events = fill(settings, registry)
    env = {**env_for(settings), "TALLY_API__RATE_LIMIT": "1000000/second"}
    try:
        with serving(settings, spec, events, env) as running:
            yield running
    finally:
        opensearch.delete(f"{prefix}*")
