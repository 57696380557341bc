"""``GET /v1/admin/dead-letters`` (the newest, with reasons) and ``POST
/v1/admin/dead-letters/replay`` (republish them to their source topic, once each)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ingest.deadletter import list_dead_letters, replay
from query_api.deps import AdminDep, ServicesDep
from query_api.models import ADMIN_ERRORS, DeadLetter, DeadLetters, Replayed

router = APIRouter(tags=["admin"])


@router.get("/v1/admin/dead-letters", response_model=DeadLetters, responses=ADMIN_ERRORS)
def dead_letters(
    services: ServicesDep,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="how many of the newest")] = 50,
) -> DeadLetters:
    settings, spec = services.settings, services.spec
    letters = list_dead_letters(settings, spec)
    letters.sort(key=lambda d: (d.get("failed_at") or 0.0, d["dlq_offset"]), reverse=True)
    recorded = unpublished = 0
    for done, pending in services.reader.ingest_figures(spec.name).dead_letters.values():
        recorded, unpublished = recorded + done, unpublished + pending
    return DeadLetters(
        datasource=spec.name,
        topic=settings.topic(spec.dead_letter_topic),
        recorded=recorded,
        unpublished=unpublished,
        dead_letters=[DeadLetter(**d) for d in letters[:limit]],
    )


@router.post("/v1/admin/dead-letters/replay", response_model=Replayed, responses=ADMIN_ERRORS)
def replay_dead_letters(services: ServicesDep, _: AdminDep) -> Replayed:
    """Every letter not replayed before goes back to its source topic (fix the producer
    or the spec first: a letter that fails again is dead-lettered again)."""
    return Replayed(replayed=replay(services.settings, services.spec))
