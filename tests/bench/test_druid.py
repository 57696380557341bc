"""``bench/druid.py``: what it says without Java, and the reference it checks both
backends' merged counts against. The measurements are the benchmark's business."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from bench.druid import generate, merged_rows, pick_merchant
from tests.engines.test_cli_errors import bare_env

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "druid.py"


def test_without_java_it_is_one_line_and_exit_2_before_any_work(tmp_path: Path) -> None:
    ran = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "small"],
        capture_output=True,
        text=True,
        env=bare_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert ran.returncode == 2, ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "java" in lines[0], ran.stderr
    assert ran.stdout == ""


def test_the_reference_is_the_latest_version_of_every_good_key() -> None:
    wires = generate(3000)
    latest = merged_rows(wires)
    good = [orjson.loads(w.value) for w in wires if not w.malformed]
    assert len(latest) == len({e["txn_id"] for e in good}) < len(good)  # versions merged
    for event in good:
        kept = latest[event["txn_id"]]
        assert (kept["version"], kept["event_id"]) >= (event["version"], event["event_id"])
    merchant, words = pick_merchant(latest)
    assert any(r["merchant_id"] == merchant for r in latest.values()) and len(words) == 6
