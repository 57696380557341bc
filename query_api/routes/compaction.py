"""``GET /v1/admin/compaction``: partitions and whether each is due, and the recent
runs from the watcher's journal with their detection-to-done times (admin keys)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from compaction.journal import Journal
from compaction.status import partition_status
from query_api.deps import AdminDep, ServicesDep
from query_api.models import ADMIN_ERRORS, CompactionPartition, CompactionRun, CompactionStatus

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/compaction", response_model=CompactionStatus, responses=ADMIN_ERRORS)
def compaction(
    services: ServicesDep,
    _: AdminDep,
    runs: Annotated[int, Query(ge=0, le=1000, description="how many recent runs")] = 50,
) -> CompactionStatus:
    settings = services.settings
    partitions = partition_status(settings, services.registry)
    journal = Journal(settings.compaction_journal_path)
    return CompactionStatus(
        partitions=[CompactionPartition(**p) for p in partitions],
        runs=[
            CompactionRun(**vars(r), detect_to_done_s=r.detect_to_done_s)
            for r in journal.recent(runs)
        ],
    )
