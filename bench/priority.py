"""Priority between datasources (issue 17), run by ``bench/ledger.py``: payments'
freshness in one ``tally ingest`` process (both sinks) that also serves access logs,
when 200k access logs land at once.

Three runs on the development broker, each with its own topics and data directory:
payments alone at 1,000 events/s; the same with the surge, priority on (the shipped
specs: payments critical, access logs low); the same with ``ingest.priority`` off.
Freshness is produce → durable in the OLAP store (the catalog time of the first
segment holding a probe payment; probes every 100 ms, ``bench.ingest.steady``).

The bound (``BOUND_MS``, stated in the README): with priority, the surge adds at most
that much to payments' freshness p99 — a payments batch never waits for an access-log
write, and shares the machine with at most one ``ingest.yield_batch_rows`` write per
access-log lane at a time (two here: OLAP and search), each well under 100 ms on a
2-core machine. ``priority_within_bound`` records whether this run kept it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common import Figures, percentile
from bench.ingest import commit_times, env, olap_committed, running_broker, steady
from ingest.kafka import ensure_topics
from producers.access_logs import AccessLogConfig, generate_access_logs
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import encode, with_malformed
from producers.publish import Publisher
from tally.settings import Settings
from tally.specs import SpecRegistry, spec_paths

SPECS = (Path("payments"), Path("access_logs"))
RATE = 1_000  # payments per second
SURGE = 200_000  # access logs, published at once
SURGE_AFTER_S = 3.0  # into the steady stream
BOUND_MS = 250.0
MODES = {"alone": None, "surge_priority": "true", "surge_no_priority": "false"}
Log = Callable[[str], None]


def measure_priority(work_dir: Path, seconds: int, figures: Figures, log: Log) -> None:
    registry = SpecRegistry.load(spec_paths(SPECS))
    surge_file = work_dir / "surge.jsonl"
    payments = GeneratorConfig(transactions=10, merchants=200, seed=17)
    with surge_file.open("wb") as out:
        for event in generate_access_logs(AccessLogConfig(SURGE, payments, seed=17)):
            out.write(encode(event) + b"\n")
    p99: dict[str, float] = {}
    with running_broker("tansu", work_dir) as bootstrap:
        for mode, priority in MODES.items():
            lags, surge_s = _run(work_dir, bootstrap, registry, mode, priority, seconds, log)
            figures.add(f"priority_{mode}_freshness_p50_ms", percentile(lags, 50), "ms")
            p99[mode] = figures.add(f"priority_{mode}_freshness_p99_ms", percentile(lags, 99), "ms")
            if surge_s is not None:
                figures.add(f"priority_{mode}_surge_ingested_s", surge_s, "s")
            log(f"{mode}: {len(lags)} probes, p99 {p99[mode]:.0f} ms, surge {surge_s} s")
    added = p99["surge_priority"] - p99["alone"]
    figures.add("priority_added_p99_ms", added, "ms")
    figures.add("priority_added_p99_ms_without", p99["surge_no_priority"] - p99["alone"], "ms")
    figures.add("priority_bound_ms", BOUND_MS, "ms")
    figures.add("priority_within_bound", float(added <= BOUND_MS), "bool")


def _run(
    work_dir: Path,
    bootstrap: str,
    registry: SpecRegistry,
    mode: str,
    priority: str | None,
    seconds: int,
    log: Log,
) -> tuple[list[float], float | None]:
    """One run; returns the probes' produce → durable lags (ms) and, with a surge, the
    seconds from its first message to its last one durable."""
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        data_dir=work_dir / mode,
        kafka_bootstrap=bootstrap,
        topic_namespace=f"p{run}.",
        specs=SPECS,
    )
    ensure_topics(settings, registry)
    run_env = {**env(settings), "TALLY_SPECS": json.dumps([str(p) for p in SPECS])}
    if priority is not None:
        run_env["TALLY_INGEST__PRIORITY"] = priority
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs = (settings.data_dir / "ingest.log").open("wb")  # kept for a look after a bad run
    ingest = subprocess.Popen(
        [sys.executable, "-m", "tally", "ingest"], env=run_env, stdout=logs, stderr=logs
    )
    publish = [sys.executable, "-m", "tally", "publish", str(work_dir / "surge.jsonl")]
    surges: list[subprocess.Popen[bytes]] = []
    surge_at: list[float] = []

    def land() -> None:  # the surge, in a process of its own, beside the steady stream
        surge_at.append(time.time())
        surges.append(
            subprocess.Popen(
                [*publish, "--datasource", "access_logs"],
                env=run_env,
                stdout=subprocess.DEVNULL,
                stderr=logs,
            )
        )

    timer = threading.Timer(SURGE_AFTER_S, land)
    try:
        _warm_up(settings, registry, log)
        if priority is not None:
            timer.start()
        topic = settings.topic("payments.v1")
        produced = steady(Publisher(settings, topic), topic, seconds, RATE)
        if priority is not None:
            timer.join()
        surge = surges[0] if surges else None
        if surge is not None:
            surge.wait(120)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (
            not _all_durable(settings, produced)
            or (surge and olap_committed(settings, "access_logs") < SURGE)
        ):
            time.sleep(0.5)
    finally:
        timer.cancel()
        for proc in surges:
            if proc.poll() is None:
                proc.kill()
        ingest.terminate()
        ingest.wait(60)
        logs.close()
    committed = commit_times(settings)
    lags = [(committed[t] - p) * 1000 for t, p in produced.items() if t in committed]
    surge_s = _last_commit(settings, "access_logs") - surge_at[0] if surge_at else None
    return lags, surge_s


def _warm_up(settings: Settings, registry: SpecRegistry, log: Log) -> None:
    """Until the process has joined and committed a first payments batch."""
    warm = GeneratorConfig(transactions=200, merchants=5, days=1, seed=3)
    wires = with_malformed(generate_events(warm), 0.0, warm.seed)
    Publisher(settings, settings.topic("payments.v1")).send(wires)
    deadline = time.monotonic() + 60
    while olap_committed(settings, "payments") == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("tally ingest committed nothing in 60 s")
        time.sleep(0.2)
    log(f"{settings.topic_namespace} ingest warmed up")


def _all_durable(settings: Settings, produced: dict[str, float]) -> bool:
    return len(commit_times(settings)) >= len(produced)


def _last_commit(settings: Settings, datasource: str) -> float:
    import sqlite3

    con = sqlite3.connect(f"file:{settings.catalog_path}?mode=ro", uri=True)
    try:
        (last,) = con.execute(
            "SELECT max(created_at) FROM segments WHERE datasource = ?", (datasource,)
        ).fetchone()
    finally:
        con.close()
    return float(last)
