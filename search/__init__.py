"""Keyword search backends behind one small protocol (tantivy embedded, Elasticsearch).

The index only *proposes* candidate ids for a keyword; the OLAP store applies every
filter and supplies every field. So the index keeps just what finding needs: key,
tenant, partition time, version and the searchable text.
"""

from __future__ import annotations

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


def open_index(settings: Settings, spec: DatasourceSpec, *, readonly: bool = False) -> SearchIndex:
    if settings.search.backend == "elasticsearch":
        from search.elastic_index import ElasticIndex

        return ElasticIndex(settings, spec)
    from search.tantivy_index import TantivyIndex

    return TantivyIndex(settings, spec, readonly=readonly)


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
