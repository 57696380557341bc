"""Keyword search backends behind one small protocol (tantivy embedded, Elasticsearch,
OpenSearch).

The index only *proposes* candidate ids for a keyword; the OLAP store applies every
filter and supplies every field. So the index keeps just what finding needs: key,
tenant, partition time, version and the searchable text.
"""

from __future__ import annotations

import importlib
from typing import cast

from search.protocol import (
    Doc,
    Hit,
    ReplaceResult,
    SearchCapabilities,
    SearchIndex,
    SearchOrder,
    UpsertResult,
)
from tally.settings import Settings
from tally.specs import DatasourceSpec

# backend name → "module:class" of its SearchIndex (tantivy: the embedded default). A
# new backend is a module and one line here.
BACKENDS: dict[str, str] = {
    "tantivy": "search.tantivy_index:TantivyIndex",
    "elasticsearch": "search.elastic_index:ElasticIndex",
    "opensearch": "search.opensearch_index:OpenSearchIndex",
}


def open_index(settings: Settings, spec: DatasourceSpec, *, readonly: bool = False) -> SearchIndex:
    """The configured backend's index of ``spec`` (``readonly``: a reader that never
    writes, which an embedded index must know; a cluster's ignores it)."""
    module, _, name = BACKENDS[settings.search.backend].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cast(SearchIndex, cls(settings, spec, readonly=readonly))


__all__ = [
    "Doc",
    "Hit",
    "ReplaceResult",
    "SearchCapabilities",
    "SearchIndex",
    "SearchOrder",
    "UpsertResult",
    "open_index",
]
