"""What the verification suites share: ingest into the sinks until idle, and run
``tally verify --format json`` as an operator would."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ingest.service import run_ingest
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.cli import tally
from tests.ingest.conftest import env_for


def ingest_until_idle(
    settings: Settings, registry: SpecRegistry, sinks: Sequence[str] = ("olap", "search")
) -> None:
    spec = registry.get("payments")
    reports = run_ingest(settings, [spec], list(sinks), threading.Event(), until_idle=1.0)
    assert not [r.error for r in reports if r.error]


def verify_json(settings: Settings, *args: str, recheck: str = "0.5") -> tuple[int, dict[str, Any]]:
    """Exit code and report of ``tally verify --datasource payments``: 0 or 1, never
    a traceback, and a non-zero exit says why in one ``error:`` line."""
    ran = tally(
        "verify",
        "--datasource",
        "payments",
        "--format",
        "json",
        "--recheck",
        recheck,
        *args,
        env=env_for(settings),
    )
    assert "Traceback" not in ran.err, ran.err[-3000:]
    assert ran.code in (0, 1), ran.err[-3000:]
    if ran.code:
        assert [line for line in ran.err.splitlines() if line.startswith("error:")], ran.err
    return ran.code, ran.json()
