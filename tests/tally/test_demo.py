"""`tally demo` runs the platform end to end — broker, both sinks, the watcher, the
query API with a demo key — serves non-zero sales within a minute, and stops cleanly
on SIGINT (the broker it started and the API server included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from engines.devbroker import reachable
from tests.ingest.conftest import free_port

pytestmark = pytest.mark.slow
SEOUL = ZoneInfo("Asia/Seoul")


def test_demo_serves_sales_within_a_minute_and_stops_on_sigint(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(tmp_path / "demo"),
        "TALLY_KAFKA_BOOTSTRAP": bootstrap,
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tally", "demo", "--rate", "1500", "--format", "json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once everything answers
        assert line, proc.stderr.read() if proc.stderr else ""
        ready = json.loads(line)
        assert set(ready) == {"url", "api_key"}
        today = datetime.now(SEOUL).replace(hour=0, minute=0, second=0, microsecond=0)
        params = {
            "from": (today - timedelta(days=29)).isoformat(),
            "to": (today + timedelta(days=1)).isoformat(),
            "granularity": "day",
        }
        headers = {"Authorization": f"Bearer {ready['api_key']}"}
        count = 0
        while time.monotonic() - started < 60 and not count:
            resp = httpx.get(f"{ready['url']}/v1/sales", params=params, headers=headers)
            assert resp.status_code == 200, resp.text
            count = sum(b["count"] for b in resp.json()["buckets"])
            if not count:
                time.sleep(0.5)  # polling for data to land, not to make timing pass
        assert count > 0, "no sales served within 60 s of starting the demo"
        assert resp.json()["source"] != "base"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not reachable(bootstrap), "the broker the demo started is stopped again"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ready['url']}/healthz", timeout=2)
