"""``bench/ingest.py`` across brokers: what it says without Kafka's tools, and its table.

The measurements themselves are the benchmark's business (run it); here only what
must not regress silently: a missing tool is one line before any work, and the
table keeps the brokers side by side with a skipped one marked and explained.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.common import Figures
from bench.ingest import measures, side_by_side
from tests.engines.test_cli_errors import bare_env

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "ingest.py"


def run_bench(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_kafka_alone_without_java_is_one_line_exit_2_before_any_work(tmp_path: Path) -> None:
    ran = run_bench("--broker", "kafka", env=bare_env(tmp_path))
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.strip().splitlines() == [
        "error: kafka unavailable: java not found on PATH (the local engines need Java 17+)"
    ]
    assert ran.stdout == ""


def test_kafka_alone_without_maven_and_no_cached_artifacts_is_one_line(tmp_path: Path) -> None:
    ran = run_bench("--broker", "kafka", env=bare_env(tmp_path, "java"))
    assert ran.returncode == 2, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: kafka unavailable: mvn"), ran.stderr


def test_the_table_puts_brokers_side_by_side_and_says_why_one_was_skipped() -> None:
    figures = Figures()
    for name, unit in measures(None):
        figures.add(f"{name}_tansu", 1234.5, unit)
        figures.skip(f"{name}_kafka", unit, "java not found on PATH")
    lines = side_by_side(figures, ["tansu", "kafka"], measures(None), "t").splitlines()
    assert lines[1].split() == ["figure", "tansu", "kafka", "unit"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:-1]}
    assert list(rows) == [name for name, _ in measures(None)]
    assert rows["freshness_p99_ms"] == ["1,234.5", "skipped", "ms"]
    assert lines[-1] == "kafka: skipped, java not found on PATH"
    assert figures.as_list()[-1]["value"] is None  # recorded as null, with the reason
