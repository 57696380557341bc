"""Exactly-once under crashes: SIGKILL the ingest process mid-work, again and again."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage import open_store
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import build
from tests.ingest.verify import assert_exact

pytestmark = pytest.mark.slow


def _progress(settings: Settings, registry: SpecRegistry) -> int:
    store = open_store(settings, registry)
    try:
        return sum(store.stored_offsets("payments").values())
    finally:
        store.close()


def _wait_for_progress(
    settings: Settings, registry: SpecRegistry, above: int, proc: object, timeout_s: float = 60
) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = _progress(settings, registry)
        if now > above:
            return now
        assert proc.poll() is None, "ingest exited before making progress"  # type: ignore[attr-defined]
        time.sleep(0.05)
    raise AssertionError("ingest made no progress")


def test_exactly_once_across_repeated_sigkills(
    topics: Settings, registry: SpecRegistry, tmp_path: Path
) -> None:
    settings = topics
    published = build(
        GeneratorConfig(
            transactions=50_000,
            merchants=40,
            days=20,
            seed=11,
            cancel_rate=0.15,
            duplicate_rate=0.03,
            out_of_order_rate=0.05,
        ),
        malformed_rate=0.004,
    )
    assert len(published.wires) >= 50_000 and published.malformed
    spec = registry.get("payments")
    publisher = Publisher(settings, settings.topic(spec.datasource.topic))
    stages = 5
    size = -(-len(published.wires) // stages)
    rng = random.Random(5)
    kills = 0
    log = tmp_path / "ingest.log"
    for stage in range(stages):
        before = _progress(settings, registry)
        publisher.send(published.wires[stage * size : (stage + 1) * size])
        proc = start_ingest(settings, "--sink", "all", log=log)
        _wait_for_progress(settings, registry, before, proc)
        time.sleep(rng.uniform(0.0, 0.8))  # a random point inside the work, not a timing crutch
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
    assert kills >= 5
    final = start_ingest(settings, "--sink", "all", "--until-idle", "5", log=log)
    final.communicate(timeout=300)
    assert final.returncode == 0, log.read_text()[-3000:]
    assert_exact(settings, registry, published)
