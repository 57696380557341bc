"""`tally demo` runs the platform end to end — broker, both sinks, the watcher, the
query API with a demo key — serves non-zero sales within a minute, and stops cleanly
on SIGINT (the broker it started and the API server included)."""

from __future__ import annotations

import json
import os
import re
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
from storage import open_reader, open_store
from tally.cli import DEMO_SPECS
from tally.settings import Settings
from tally.specs import SpecRegistry, spec_paths
from tests.ingest.conftest import free_port

pytestmark = pytest.mark.slow
SEOUL = ZoneInfo("Asia/Seoul")
_TALLY = (sys.executable, "-m", "tally")


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
        settled = 0  # the settlements streamed beside them, joined to their payments
        sql = {"sql": "SELECT count(*) FROM settlements s JOIN payments p ON s.txn_id = p.txn_id"}
        while time.monotonic() - started < 90 and not settled:
            resp = httpx.post(f"{ready['url']}/v1/sql", json=sql, headers=headers)
            assert resp.status_code == 200, resp.text
            settled = resp.json()["rows"][0][0]
            if not settled:
                time.sleep(0.5)  # polling for data to land
        assert settled > 0, "no settlement of a stored payment served within 90 s"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:  # a failed check: the demo still stops what it started
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert not reachable(bootstrap), "the broker the demo started is stopped again"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{ready['url']}/healthz", timeout=2)
    # The access logs streamed beside the payments: stored whole, rolled up by hour.
    registry = SpecRegistry.load(spec_paths(DEMO_SPECS))
    reader = open_reader(Settings(data_dir=tmp_path / "demo"), registry)
    try:
        logs = reader.query("SELECT count(*) FROM access_logs").rows[0][0]
        rolled = reader.query("SELECT sum(requests) FROM access_logs_hourly").rows[0][0]
        settlements = reader.query("SELECT count(*) FROM settlements").rows[0][0]
        paid = reader.query("SELECT sum(count) FROM settlements_daily").rows[0][0]
    finally:
        reader.close()
    assert logs > 0 and rolled == logs
    assert settlements > 0 and paid == settlements


def test_demo_on_kafka_serves_sales_and_stops_the_kafka_it_started(tmp_path: Path) -> None:
    """``tally demo --broker kafka``: the same platform on Apache Kafka, which the demo
    starts through ``tally engines`` under its data dir and stops again."""
    from tests.brokers import missing_tools, not_available

    if (reason := missing_tools()) is not None:
        not_available(reason)
    data = tmp_path / "demo"
    env = {**os.environ, "TALLY_DATA_DIR": str(data)}
    port = str(free_port())
    proc = subprocess.Popen(
        [*_TALLY, "demo", "--broker", "kafka", "--rate", "500", "--format", "json", "--port", port],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        ready = json.loads(line)
        status = json.loads(
            subprocess.run(
                [*_TALLY, "engines", "status", "--format", "json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        assert status["engines"]["kafka"]["running"] is True
        headers = {"Authorization": f"Bearer {ready['api_key']}"}
        deadline = time.monotonic() + 60
        count = 0
        while not count and time.monotonic() < deadline:
            resp = httpx.get(
                f"{ready['url']}/v1/transactions", params={"limit": 5}, headers=headers
            )
            assert resp.status_code == 200, resp.text
            count = len(resp.json()["items"])
            if not count:
                time.sleep(0.5)  # polling for data to land, not to make timing pass
        assert count > 0, "no transactions served within 60 s of the ready line"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = subprocess.run(
        [*_TALLY, "engines", "status", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(after.stdout)["engines"]["kafka"]["running"] is False


def test_the_demo_prints_the_dashboard_and_console_urls_and_both_open(tmp_path: Path) -> None:
    """The table output names both pages, with the keys that sign in to them; each
    page answers, and the admin key it prints is an admin key."""
    port = free_port()
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(tmp_path / "demo"),
        "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [*_TALLY, "demo", "--rate", "200", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "demo.err").open("w"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:
            printed.append(line)
            if line.startswith("Operator console:"):
                break
        text = "".join(printed)
        url = f"http://127.0.0.1:{port}"
        assert f"Merchant dashboard: {url}/dashboard" in text, text
        console = re.search(rf"Operator console: +{url}/console +\(admin key: (tly_\S+)\)", text)
        assert console, text
        for page in ("/dashboard", "/console"):
            assert httpx.get(url + page).status_code == 200
        headers = {"Authorization": f"Bearer {console.group(1)}"}
        assert httpx.get(f"{url}/v1/admin/backends", headers=headers).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0, (tmp_path / "demo.err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _demo_until_it_grows(data_dir: Path, tmp_path: Path) -> tuple[list[int], str, int]:
    """Run ``tally demo`` (its table output) until it printed three transaction counts,
    then press Ctrl-C as a terminal does: SIGINT to the whole process group."""
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(data_dir),
        "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
    }
    err_path = tmp_path / f"demo-{time.monotonic_ns()}.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [*_TALLY, "demo", "--rate", "1500"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own group, as a shell gives a foreground job
        )
        counts: list[int] = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 150
            while len(counts) < 3 and time.monotonic() < deadline:
                line = proc.stdout.readline()  # a line every 5 s once it runs
                if not line:
                    break
                if found := re.match(r"([\d,]+) transactions from", line):
                    counts.append(int(found.group(1).replace(",", "")))
            os.killpg(proc.pid, signal.SIGINT)
            proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return counts, err_path.read_text(), proc.returncode


def test_a_second_demo_on_the_same_data_dir_starts_clean_and_ctrl_c_is_quiet(
    tmp_path: Path,
) -> None:
    """The development broker keeps nothing between runs, so a second demo on the same
    data directory must not resume the first one's positions (it did: the store looked
    frozen for a minute while the new topic's first messages were skipped). And Ctrl-C
    stops the parts in order, the broker last: no client is left retrying it."""
    data_dir = tmp_path / "demo"
    first, err, code = _demo_until_it_grows(data_dir, tmp_path)
    assert code == 0 and len(first) == 3, err[-3000:]
    assert "cleared the previous demo" not in err  # nothing to clear the first time
    second, err, code = _demo_until_it_grows(data_dir, tmp_path)
    assert code == 0 and len(second) == 3, err[-3000:]
    assert "cleared the previous demo's segments, search, catalog.sqlite" in err, err[-3000:]
    assert second == sorted(second) and second[0] < second[-1], second  # growing, not frozen
    assert second[0] < first[-1], (first, second)  # started from an empty store
    for noise in ("rdkafka", "%3|", "Connection refused", "Traceback"):
        assert noise not in err, err[-3000:]
    registry = SpecRegistry.load(spec_paths(DEMO_SPECS))
    store = open_store(Settings(data_dir=data_dir), registry)
    try:
        positions = store.stored_positions("payments").values()
    finally:
        store.close()
    assert len({p.log for p in positions}) == 1 and None not in {p.log for p in positions}
