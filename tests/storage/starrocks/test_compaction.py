"""`tally compaction status|run` on StarRocks: partitions that received late writes
are due, and running compacts them with ``ALTER TABLE … COMPACT``.

Not proven on the stand-in: that StarRocks merges the partition's versions (it only
records the statement), nor its "too many versions" pressure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from storage.protocol import OffsetRange
from storage.starrocks.store import StarRocksStore
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.factories import payment
from tests.ingest.conftest import env_for
from tests.storage.starrocks.standin import StandIn

TOPIC = "payments.v1"


def _tally(settings: Settings, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tally", *args, "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env_for(settings)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def test_late_partitions_are_due_and_running_compacts_them(
    sr_settings: Settings, registry: SpecRegistry, standin: StandIn
) -> None:
    old = datetime.now(UTC) - timedelta(days=40)
    store = StarRocksStore(sr_settings, registry)
    for i in range(4):  # four loads into one old day: four versions of its tablets
        rows = [payment(f"k{i}", approved_at=old), payment("k0", i + 2, approved_at=old)]
        store.commit("payments", rows, {(TOPIC, 0): OffsetRange(2 * i, 2 * i + 2)})
    store.close()
    status = _tally(sr_settings, "compaction", "status", "--datasource", "payments")
    (row,) = [p for p in status["partitions"] if p["datasource"] == "payments"]
    assert row["late_rows"] == 7 and row["segments"] == 4 and row["due"], row
    before = len(standin.stats.compactions)
    _tally(sr_settings, "compaction", "run", "--datasource", "payments")
    sent = standin.stats.compactions[before:]
    db, name = sr_settings.starrocks.database, "p" + row["partition"].replace("-", "")
    assert sent == [f"ALTER TABLE `{db}`.`payments` COMPACT `{name}`"]
    (after,) = [
        p
        for p in _tally(sr_settings, "compaction", "status", "--datasource", "payments")[
            "partitions"
        ]
        if p["datasource"] == "payments"
    ]
    assert after["late_rows"] == 0 and not after["due"] and after["last_compacted_at"]
