"""``GET /v1/admin/ingestion``: per sink and partition, the committed position, the
partition's end and the lag between them, and each sink's freshness (admin keys)."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter

from ingest.kafka import committed_offsets, end_offsets, partition_count
from query_api.deps import AdminDep, ServicesDep
from query_api.models import ADMIN_ERRORS, IngestionStatus, PartitionPosition, SinkStatus

router = APIRouter(tags=["admin"])


def _positions(
    committed: Mapping[int, int], ends: Mapping[int, int], partitions: list[int]
) -> list[PartitionPosition]:
    out = []
    for p in partitions:
        at, end = committed.get(p), ends.get(p)
        # An end before what was committed is no end (the development broker
        # misreports them): the lag is then unknown, not zero.
        lag = None if end is None or end < (at or 0) else end - (at or 0)
        out.append(PartitionPosition(partition=p, committed=at, end=end, lag=lag))
    return out


@router.get("/v1/admin/ingestion", response_model=IngestionStatus, responses=ADMIN_ERRORS)
def ingestion(services: ServicesDep, _: AdminDep) -> IngestionStatus:
    """The OLAP sink's positions are the store's own where it commits them with the
    rows (they are what is durable), else its consumer group's; the search sink's are
    its group's, committed after each index commit."""
    settings, spec = services.settings, services.spec
    topic = settings.topic(spec.datasource.topic)
    partitions = list(range(partition_count(settings, topic) or 0))
    ends = end_offsets(settings, topic, partitions) if partitions else {}
    figures = services.reader.ingest_figures(spec.name)
    sinks = []
    for sink in ("olap", "search"):
        group = settings.group(sink, spec.name)
        if sink == "olap" and services.reader.capabilities.transactional_offsets:
            at = {p: o for (t, p), o in figures.offsets.items() if t == topic}
            fresh = figures.newest_event_at
        else:
            at = committed_offsets(settings, group, topic, partitions) if partitions else {}
            fresh = figures.newest_event_at if sink == "olap" else services.search.freshness()
        sinks.append(
            SinkStatus(
                sink=sink, group=group, freshness=fresh, partitions=_positions(at, ends, partitions)
            )
        )
    return IngestionStatus(datasource=spec.name, topic=topic, sinks=sinks)
