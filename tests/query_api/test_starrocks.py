"""The query API on the StarRocks backend (a real ``tally serve`` reading the
session's StarRocks stand-in, or the real StarRocks ``TALLY_TEST_STARROCKS`` names):
the embedded suites' route and SQL tests, imported and run here, where ``api`` is
the StarRocks-backed server.

On the stand-in these do not prove StarRocks' own SQL semantics: the statements Tally
renders in StarRocks' dialect are transpiled by sqlglot and run by DuckDB, so a
function StarRocks evaluates differently (CONVERT_TZ across DST, say) is not caught.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from storage.starrocks.store import StarRocksStore
from tally.specs import SpecRegistry
from tests.ingest.conftest import env_for
from tests.query_api.conftest import Api, _history, index_docs, serving
from tests.query_api.test_routes import (  # noqa: F401 (collected here, on StarRocks)
    SEOUL_MIDNIGHT,
    test_a_cursor_belongs_to_its_query,
    test_hybrid_search_equals_a_brute_force_scan,
    test_no_request_to_any_route_returns_another_merchants_row,
    test_one_transaction_is_only_its_merchants,
    test_pages_cover_every_row_once_newest_first,
    test_sales_equal_a_recount,
)
from tests.query_api.test_sql import (  # noqa: F401 (collected here, on StarRocks)
    _SHAPES,
    PAYMENT_SOURCES,
    _sql,
    test_dialects_answer_alike_and_only_for_the_key,
    test_every_attack_is_refused_with_a_4xx,
)
from tests.storage.starrocks.target import Target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(
    starrocks: Target, tmp_path_factory: pytest.TempPathFactory, registry: SpecRegistry
) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("api-starrocks")
    settings = starrocks.settings(data_dir, registry)
    spec = registry.get("payments")
    history = _history(600, seed=7)
    # Two batches, the second before the first for some keys (out of order) and
    # redelivering every tenth event of the first (duplicates).
    first, second = history[1::2], history[0::2] + history[1::2][::10]
    store = StarRocksStore(settings, registry)
    store.commit("payments", first)
    store.commit("payments", second)
    store.close()
    events = first + second
    index_docs(settings, spec, events)
    env = {**env_for(settings), "TALLY_API__RATE_LIMIT": "1000000/second"}
    with serving(settings, spec, events, env) as running:
        yield running
