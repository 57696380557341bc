"""`tally demo` runs the platform end to end and stops cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.broker import reachable
from tests.ingest.conftest import free_port

pytestmark = pytest.mark.slow


def test_demo_streams_ingests_and_serves_rollup_routed_sales(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(tmp_path / "demo"),
        "TALLY_KAFKA_BOOTSTRAP": bootstrap,
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tally",
            "demo",
            "--duration",
            "20",
            "--rate",
            "1500",
            "--format",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert reports, proc.stdout
    last = reports[-1]
    assert last["transactions"] > 0
    assert last["sales_source"] == "payments_daily"
    assert sum(s["count"] for s in last["sales_30d"]) > 0
    counts = [r["transactions"] for r in reports]
    assert counts == sorted(counts), "the stream keeps landing"
    assert not reachable(bootstrap), "the broker the demo started is stopped again"
