"""Embedded store vs Apache Druid (issue 12): the same generated events into both
backends in one run, on one Apache Kafka, measured side by side.

    .venv/bin/python bench/druid.py --scale small|full [--events N] [--steady-s S]

``tally engines up kafka druid`` starts both engines once (in this run's temporary
data dir; ``tally engines down`` stops them at the end, whatever happened). Then:

* **ingest** — the same messages (payments over 120 days, cancellations, duplicates,
  0.1% malformed) into a namespace per backend, all published first. Embedded:
  ``tally ingest --sink olap`` writes segments. Druid: ``tally druid apply`` submits
  the supervisor first, then ``tally ingest --sink olap`` is the relay (events topic →
  refined topic) and Druid's Kafka supervisor loads the refined topic.
  ``ingest_olap_events_per_s`` is the OLAP sink's rate, first commit to the commit
  that covers the last message (catalog offsets; the relay's group offsets, moved
  only inside its transactions). ``ingest_e2e_events_per_s`` is from the first
  produce until every row is visible to a query: the catalog covers every message
  (embedded), Druid's ``COUNT(*)`` equals the good rows produced (Druid); then the
  merged count (latest version per key, through the reader) must equal the
  generator's number of keys on both, or the run fails.
* **api** — ``tally serve`` (two workers) on each backend over those rows: 90-day
  merchant sales by day (as routed: from a rollup on both, Druid's summing the
  relay's retraction deltas; and forced to the base on both) and hybrid search
  (``/v1/transactions?q=``, keywords from the merchant's own rows), p50/p99 through
  ``bench/api.py``'s client. The embedded store is compacted first, as its watcher
  keeps it; the search index is built once by ``tally ingest --sink search`` and
  copied to the Druid side (it is the same index whatever store disposes).
* **late** — per round, 20 cancellations of payments in one old day (10 days at full
  scale), produced while each namespace's OLAP sink runs (the relay and the supervisors
  on Druid, their ingested history handed off first) and the real compaction watcher
  (default settings) runs in this process: ``late_write_to_compacted`` from the
  produce to the watcher's Done for that day's base partition (one segment again; one
  Druid segment set, served), ``late_detect_to_started`` from the watcher's detection
  of the late segment to the compaction's start (the Druid task submitted), and
  ``late_detect_to_compacted`` to its Done.
* **freshness** — a steady stream (``bench/ingest.py``'s: today's payments and a probe
  payment every 100 ms) into a fresh namespace per backend, the OLAP sink (relay and
  supervisor on Druid) and the search sink each in its own process; a reader process
  polls the merged view of the last hour through the backend's reader (DruidReader on
  Druid, Druid SQL on its broker) and notes when each probe appears.

Measured (``--scale full``, 119,139 messages, 2 cores and nothing else running; load
average 1.9 at the start, 8.0 at the end, 6 min): embedded vs Druid, OLAP sink 37.1k
vs relay (the delta producer: its transactions carry the rollups' deltas and key
states) 20.4k events/s; end to end 20.7k vs 3.8k events/s (both Druid rollups exact
32 s after the first produce); 90-day merchant sales p50/p99 5.6/10.0 ms from
``payments_daily`` vs 138/253 ms from Druid's ``payments_daily``, forced to the base
26.7/58.2 vs 241/441 ms (base/rollup p99 ratio 5.8 vs 1.7); search p50 18 vs 183 ms;
late write → compacted p50/p99 2.0/2.9 vs 9.2/17.1 s, detection → compaction started
1.8/1.9 vs 3.7/7.8 s (Druid: the early handoff publishing the late rows, then the task
submitted), detection → compacted 1.9/2.0 vs 8.2/16.0 s; freshness p50/p99 0.31/0.70
vs 0.42/1.05 s; the relay's key state 395 bytes per key. Before the local Druid's
handoff poll was 2 s (Druid's default is a minute), a handed-off task held its slot
for a minute and Druid's late write → compacted was 20.8/38.5 s.

Figures are ``<measure>_embedded`` and ``<measure>_druid``; ``load_average_1m_*`` are
the machine's at the start and the end: the numbers are only as quiet as the machine.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from confluent_kafka import Consumer
from sqlglot import exp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import api as api_bench  # noqa: E402
from bench import ingest as ingest_bench  # noqa: E402
from bench.common import Figures, Log, format_grid, parser, percentile, write_results  # noqa: E402
from bench.relay import committed  # noqa: E402
from ingest.kafka import base_config, ensure_topics  # noqa: E402
from producers.generate import GeneratorConfig, generate_events  # noqa: E402
from producers.malformed import Wire, with_malformed  # noqa: E402
from producers.publish import Publisher  # noqa: E402
from query_api.keys import KeyStore  # noqa: E402
from query_api.ready import wait_ready  # noqa: E402
from storage import open_reader  # noqa: E402
from storage.druid.capabilities import CAPABILITIES as DRUID  # noqa: E402
from storage.druid.supervisor import datasource_name  # noqa: E402
from storage.keystate import KeyStates  # noqa: E402
from storage.sql import subquery  # noqa: E402
from tally.errors import EngineUnavailable, TallyError  # noqa: E402
from tally.settings import DruidSettings, Settings, StoreSettings  # noqa: E402
from tally.specs import SpecRegistry, builtin_spec_paths  # noqa: E402

SCALES = {
    "small": {
        "events": 60_000,
        "steady_s": 10,
        "rate": 1000,
        "requests": 40,
        "clients": (1,),
        "late_rounds": 4,
    },
    "full": {
        "events": 120_000,
        "steady_s": 30,
        "rate": 1000,
        "requests": 30,
        "clients": (1,),
        "late_rounds": 10,
    },
}
BACKENDS = ("embedded", "druid")
DAYS = 120
START = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(hours=9)  # Seoul midnight
MERCHANTS = 200
Logger = Callable[[str], None]


# --- engines ---------------------------------------------------------------------------


def tally_cli(args: list[str], env: dict[str, str], timeout_s: float = 600) -> str:
    """``tally <args>``'s stdout; its stderr's last line as the error if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "tally", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        error = EngineUnavailable if proc.returncode == 2 else TallyError
        raise error(f"tally {' '.join(args)}: {last}")
    return proc.stdout


@contextlib.contextmanager
def engines_up(data_dir: Path, log: Logger) -> Iterator[dict[str, str]]:
    """``tally engines up kafka druid`` once; yields its ``env``; ``down`` on the way out."""
    env = {"TALLY_DATA_DIR": str(data_dir)}
    started = time.monotonic()
    try:
        out = tally_cli(["engines", "up", "kafka", "druid", "--format", "json"], env, 900)
        up: dict[str, str] = json.loads(out.strip().splitlines()[-1])["env"]
        log(f"engines up in {time.monotonic() - started:.0f} s: {up}")
        yield up
    finally:
        with contextlib.suppress(TallyError, subprocess.TimeoutExpired):
            tally_cli(["engines", "down"], env, 300)
            log("engines down")


# --- the events and what they merge to ---------------------------------------------------


def generate(events: int) -> list[Wire]:
    config = GeneratorConfig(
        transactions=int(events * 0.9), merchants=MERCHANTS, days=DAYS, start=START, seed=1
    )
    return list(with_malformed(generate_events(config), 0.001, 1))


def merged_rows(wires: list[Wire]) -> dict[str, dict[str, Any]]:
    """The latest (version, event_id) per txn_id of the good events: the reference."""
    latest: dict[str, dict[str, Any]] = {}
    for wire in wires:
        if wire.malformed:
            continue
        event = orjson.loads(wire.value)
        held = latest.get(event["txn_id"])
        if held is None or (event["version"], event["event_id"]) > (
            held["version"],
            held["event_id"],
        ):
            latest[event["txn_id"]] = event
    return latest


def merged_count(settings: Settings, registry: SpecRegistry) -> int:
    """``COUNT(*)`` of the merged view, through the backend's reader."""
    reader = open_reader(settings, registry)
    try:
        query = exp.select(exp.Count(this=exp.Star())).from_(
            subquery(reader.relation("payments"), "m")
        )
        return int(reader.query(query.sql(dialect=reader.capabilities.sql_dialect)).rows[0][0])
    finally:
        reader.close()


# --- settings per backend ----------------------------------------------------------------


def backend_settings(
    backend: str, data_dir: Path, engines: dict[str, str], namespace: str
) -> Settings:
    base = Settings(
        data_dir=data_dir,
        kafka_bootstrap=engines["TALLY_KAFKA_BOOTSTRAP"],
        topic_namespace=namespace,
    )
    if backend == "embedded":
        return base
    return base.model_copy(
        update={
            "store": StoreSettings(backend="druid"),
            "druid": DruidSettings(
                broker_url=engines["TALLY_DRUID__BROKER_URL"],
                overlord_url=engines["TALLY_DRUID__OVERLORD_URL"],
                coordinator_url=engines["TALLY_DRUID__COORDINATOR_URL"],
            ),
        }
    )


def env_of(settings: Settings) -> dict[str, str]:
    """The ``TALLY_*`` variables that point a Tally process at ``settings``."""
    env = {
        "TALLY_DATA_DIR": str(settings.data_dir),
        "TALLY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
        "TALLY_STORE__BACKEND": settings.store.backend,
    }
    druid = settings.druid
    for name, value in (
        ("BROKER_URL", druid.broker_url),
        ("OVERLORD_URL", druid.overlord_url),
        ("COORDINATOR_URL", druid.coordinator_url),
    ):
        if value is not None and settings.store.backend == "druid":
            env[f"TALLY_DRUID__{name}"] = value
    return env


def spawn(settings: Settings, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tally", *args],
        env={**os.environ, **env_of(settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def druid_rows(settings: Settings, registry: SpecRegistry) -> int | None:
    """Rows Druid serves in the namespace's base datasource (every version, duplicates
    too); None while the broker does not know the datasource or cannot answer."""
    name = datasource_name(settings, registry.get("payments"))
    table = exp.Table(this=exp.to_identifier(name, quoted=True))
    sql = exp.select(exp.Count(this=exp.Star())).from_(table).sql(dialect=DRUID.sql_dialect)
    try:
        got = httpx.post(
            f"{settings.druid.broker_url}/druid/v2/sql",
            json={"query": sql, "resultFormat": "array"},
            timeout=30,
        )
    except httpx.TransportError:
        return None
    return int(got.json()[0][0]) if got.status_code == 200 else None


def druid_rollup_keys(settings: Settings, rollup: str) -> int | None:
    """The rollup's summed signed count: the number of keys once every delta is in."""
    table = exp.Table(this=exp.to_identifier(f"{settings.topic_namespace}{rollup}", quoted=True))
    sql = exp.select(exp.Sum(this=exp.column("count", quoted=True))).from_(table)
    try:
        got = httpx.post(
            f"{settings.druid.broker_url}/druid/v2/sql",
            json={"query": sql.sql(dialect=DRUID.sql_dialect), "resultFormat": "array"},
            timeout=30,
        )
    except httpx.TransportError:
        return None
    if got.status_code != 200 or got.json()[0][0] is None:
        return None
    return int(got.json()[0][0])


def key_state_bytes_per_key(wires: list[Wire], registry: SpecRegistry) -> float:
    """Python heap held by the relay's key state (``storage.keystate``) per key, for
    the generated events planned in batches as the relay plans them."""
    from ingest.decode import Decoder, Message

    spec = registry.get("payments")
    decoder = Decoder(spec)
    messages = [Message("t", 0, i, w.key, w.value) for i, w in enumerate(wires) if not w.malformed]
    decoded = [decoder.decode(messages[i : i + 10_000]) for i in range(0, len(messages), 10_000)]
    gc.collect()
    tracemalloc.start()
    states = KeyStates(spec)
    before = tracemalloc.get_traced_memory()[0]
    for batch in decoded:
        states.apply(states.plan(batch.table, [0] * batch.table.num_rows))
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / max(1, len(states))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> float:
    """Poll ``check`` until true; the monotonic time it first was. TallyError past the
    deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TallyError(f"after {timeout_s:g} s: {what}")
        time.sleep(every_s)


# --- ingest ------------------------------------------------------------------------------


def ingest(
    backend: str, settings: Settings, registry: SpecRegistry, wires: list[Wire], log: Logger
) -> dict[str, float]:
    """Publish every message, run the OLAP sink, time its commits and the moment every
    row is visible; stops the sink once the rows are all there."""
    ensure_topics(settings, registry)
    if backend == "druid":
        out = tally_cli(["druid", "apply", "--format", "json"], env_of(settings))
        log(f"druid apply: {json.loads(out)['supervisors']}")
    topic = settings.topic("payments.v1")
    good = sum(1 for w in wires if not w.malformed)
    produced_at = time.monotonic()
    pub = Publisher(settings, topic)
    pub.send(wires)
    total, parts = sum(pub.ends.values()), sorted(pub.ends)
    log(f"published {total:,} messages in {time.monotonic() - produced_at:.1f} s")
    sink = spawn(settings, "ingest", "--sink", "olap")
    spawned = time.monotonic()
    probe = Consumer(
        base_config(settings)
        | {"group.id": settings.group("olap", "payments"), "isolation.level": "read_uncommitted"}
    )
    first: tuple[float, int] | None = None
    last = 0.0
    visible = 0.0
    try:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline and sink.poll() is None:
            if backend == "embedded":
                n = ingest_bench.progress(settings, registry, "olap", topic, parts)
            else:
                n = committed(probe, topic, parts)
            now = time.monotonic()
            if n and first is None:
                first = (now, n)
            if n is not None and n >= total:
                last = now
                break
            time.sleep(0.05)
        else:
            raise TallyError(f"{backend}: the OLAP sink did not commit all {total:,} messages")
        if backend == "embedded":
            visible = last  # the catalog commit is what readers see
        else:
            visible = wait_for(
                lambda: druid_rows(settings, registry) == good,
                1800,
                f"Druid never served the {good:,} rows produced",
                every_s=0.5,
            )
            keys = len(merged_rows(wires))
            for rollup in registry.get("payments").rollups:
                done = wait_for(
                    lambda r=rollup.name: druid_rollup_keys(settings, r) == keys,  # type: ignore[misc]
                    600,
                    f"Druid's {rollup.name} never summed to {keys:,} keys",
                    every_s=0.5,
                )
                log(f"{rollup.name} exact {done - produced_at:.1f} s after the first produce")
    finally:
        probe.close()
        stop([sink])
    assert first is not None
    if first[1] >= total:  # one batch held everything: time it from the sink's start
        log("the first commit covered every message: the rate counts the sink's start-up")
        first = (spawned, 0)
    keys = len(merged_rows(wires))
    got = merged_count(settings, registry)
    if got != keys:
        raise TallyError(f"{backend}: the merged count is {got:,}, the generator's keys {keys:,}")
    rates = {
        "ingest_olap_events_per_s": (total - first[1]) / max(1e-9, last - first[0]),
        "ingest_e2e_events_per_s": total / max(1e-9, visible - produced_at),
    }
    log(
        f"olap sink {rates['ingest_olap_events_per_s']:,.0f} events/s; every row visible "
        f"{visible - produced_at:.1f} s after the first produce; merged count {got:,}"
    )
    return rates


# --- api -------------------------------------------------------------------------------


def api(
    backend: str,
    settings: Settings,
    merchant: str,
    searches: list[str],
    scale: dict[str, Any],
    log: Logger,
) -> dict[str, float]:
    keys = KeyStore(settings.keys_path)
    _, key = keys.create(merchant)
    _, admin_key = keys.create(None, admin=True)
    keys.close()
    port = api_bench.free_port()
    extra = env_of(settings)
    extra["TALLY_DRUID__REQUEST_TIMEOUT_S"] = "30"
    server = api_bench.serve(settings, port, extra)
    url = f"http://127.0.0.1:{port}"
    end = START + timedelta(days=DAYS)
    sales = {
        "from": (end - timedelta(days=90)).isoformat(),
        "to": end.isoformat(),
        "granularity": "day",
    }
    routes: dict[str, tuple[str, Callable[[httpx.Client, random.Random], httpx.Response]]] = {
        "sales": (key, lambda c, r: c.get("/v1/sales", params=sales)),
        "sales_base": (
            admin_key,
            lambda c, r: c.get(
                "/v1/sales", params={**sales, "force_base": "true", "merchant": merchant}
            ),
        ),
        "search": (
            key,
            lambda c, r: c.get("/v1/transactions", params={"q": r.choice(searches), "limit": 50}),
        ),
    }
    out: dict[str, float] = {}
    try:
        wait_ready(url, server, timeout_s=120)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            source = c.get("/v1/sales", params=sales, timeout=60).json().get("source")
        log(f"sales answered from {source!r}")
        for clients in scale["clients"]:
            for name, (who, request) in routes.items():
                times = api_bench.measure(url, who, request, clients, scale["requests"])
                for q in (50, 99):
                    out[f"api_{name}_p{q}_ms_c{clients}"] = percentile(times, q)
                log(
                    f"{name} c{clients}: p50 {percentile(times, 50):.1f} ms, p99 "
                    f"{percentile(times, 99):.1f} ms"
                )
    finally:
        server.terminate()
        server.wait(30)
    return out


def compact(settings: Settings, registry: SpecRegistry, log: Logger) -> None:
    """The embedded store as its watcher keeps it (late partitions compacted)."""
    from storage import open_store

    store = open_store(settings, registry)
    api_bench.compact_as_the_watcher_would(settings, registry, store, log)
    store.close()


def index(settings: Settings, others: list[Settings], log: Logger) -> None:
    """The search index of ``settings``' events, built once and copied to ``others``."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tally", "ingest", "--sink", "search", "--until-idle", "3"],
        env={**os.environ, **env_of(settings)},
        capture_output=True,
        check=False,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise TallyError(f"the search sink failed: {proc.stderr.decode()[-500:]}")
    log(f"search index built in {time.monotonic() - started:.1f} s")
    for other in others:
        shutil.copytree(settings.data_dir / "search", other.data_dir / "search")


# --- late writes ---------------------------------------------------------------------------


def late_compactions(
    backend: str,
    settings: Settings,
    registry: SpecRegistry,
    latest: dict[str, dict[str, Any]],
    rounds: int,
    log: Logger,
) -> dict[str, float]:
    """Cancellations of payments in old days, one day per round, into the ingested
    namespace while its OLAP sink runs (the relay and the supervisors on Druid) and
    the real watcher (``compaction.watcher.Watcher``, default settings) runs in a
    thread here: per round, from the produce to the Done of the day's base partition
    (one segment, or one Druid segment set, again), and the watcher's own detection →
    start (the Druid task submitted) and detection → done."""
    import threading

    from compaction.policy import Done
    from compaction.watcher import Watcher
    from storage import open_store

    store = open_store(settings, registry)
    topic = settings.topic("payments.v1")
    procs = [spawn(settings, "ingest", "--sink", "olap")]
    finished: list[Done] = []
    stop_watch = threading.Event()
    try:
        if backend == "druid":
            # Everything the supervisors read so far is published first, so each old
            # chunk starts as published segments (the state a day later in production).
            for name in supervisor_ids(settings, registry):
                httpx.post(
                    f"{settings.druid.overlord_url}/druid/indexer/v1/supervisor/{name}"
                    "/taskGroups/handoff",
                    json={"taskGroupIds": [0]},
                    timeout=30,
                )
            wait_for(
                lambda: all(s.sealed for s in store.live_segments()),
                600,
                "Druid never published the ingested rows",
                every_s=1.0,
            )
        watcher = Watcher(settings, registry, store)
        # The state the watcher keeps: nothing late before the first round.
        for task in watcher.due():
            watcher.run_task(task)
        thread = threading.Thread(
            target=watcher.run, args=(stop_watch, finished.extend), daemon=True
        )
        thread.start()
        pub = Publisher(settings, topic)
        by_day: dict[str, list[dict[str, Any]]] = {}
        for row in latest.values():
            at = datetime.fromisoformat(row["approved_at"]).astimezone(UTC)
            # 03:00-11:00 UTC: one Seoul day and one UTC day alike.
            if row["status"] == "DONE" and 3 <= at.hour < 11:
                by_day.setdefault(at.date().isoformat(), []).append(row)
        days = sorted(d for d, rows in by_day.items() if len(rows) >= 20)[10 : 10 + 4 * rounds : 4]
        to_done, detect_start, detect_done = [], [], []
        for day in days:
            partition = store_partition(store, day)
            sent = datetime.now(UTC)
            pub.send([cancel_wire(r) for r in by_day[day][:20]])
            done = wait_for_done(finished, partition, sent, 180)
            to_done.append((done.finished_at - sent).total_seconds())
            if done.detect_to_start_s is not None and done.detect_to_done_s is not None:
                detect_start.append(done.detect_to_start_s)
                detect_done.append(done.detect_to_done_s)
            log(
                f"late write into {partition}: compacted {to_done[-1]:.1f} s after the produce"
                f" (detected → started {detect_start[-1] if detect_start else float('nan'):.1f} s)"
            )
    finally:
        stop_watch.set()
        stop(procs)
        store.close()
    return {
        "late_write_to_compacted_p50_s": percentile(to_done, 50),
        "late_write_to_compacted_p99_s": percentile(to_done, 99),
        "late_detect_to_started_p50_s": percentile(detect_start, 50),
        "late_detect_to_started_p99_s": percentile(detect_start, 99),
        "late_detect_to_compacted_p50_s": percentile(detect_done, 50),
        "late_detect_to_compacted_p99_s": percentile(detect_done, 99),
    }


def supervisor_ids(settings: Settings, registry: SpecRegistry) -> list[str]:
    from storage.druid.supervisor import supervisors

    return list(supervisors(settings, registry.get("payments")))


def store_partition(store: Any, day: str) -> str:
    """The base partition holding 03:00-11:00 UTC of ``day`` in ``store``'s naming."""
    at = datetime.fromisoformat(day).replace(hour=6, tzinfo=UTC)
    for stats in store.partition_stats("payments"):
        if stats.datasource != "payments":
            continue
        lo, hi = store.partition_range("payments", stats.partition)
        if lo <= at < hi:
            return str(stats.partition)
    raise TallyError(f"no partition holds {at}")


def cancel_wire(row: dict[str, Any]) -> Wire:
    version = row["version"] + 1
    event = row | {
        "event_id": f"{row['txn_id']}-late-v{version}",
        "event_type": "payment.canceled",
        "version": version,
        "canceled_amount": row["amount"],
        "status": "CANCELED",
        "occurred_at": datetime.now(UTC).isoformat(),
    }
    return Wire(row["txn_id"].encode(), orjson.dumps(event), None)


def wait_for_done(finished: list[Any], partition: str, after: datetime, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for done in list(finished):
            task = done.task
            key = (task.datasource, task.partition, task.kind)
            if key == ("payments", partition, "late") and done.finished_at > after:
                return done
        time.sleep(0.1)
    raise TallyError(f"the late write into {partition} was not compacted in {timeout_s:g} s")


# --- freshness -----------------------------------------------------------------------------


def freshness(
    backend: str,
    settings: Settings,
    registry: SpecRegistry,
    seconds: int,
    rate: int,
    log: Logger,
) -> list[float]:
    """Probe lags (ms) at a steady ``rate`` events/s: produce → visible to the reader."""
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if backend == "druid":
        tally_cli(["druid", "apply", "--format", "json"], env_of(settings))
    # One process per sink, as deployed; the embedded store's compaction watcher keeps
    # its hot partitions' segment counts logarithmic (Druid has no such step yet).
    procs = [spawn(settings, "ingest", "--sink", sink) for sink in ("olap", "search")]
    if backend == "embedded":
        procs.append(spawn(settings, "compaction", "watch"))
    seen_file = settings.data_dir / "seen.tsv"
    produced: dict[str, float] = {}
    try:
        pub = Publisher(settings, topic)
        warm = list(
            with_malformed(
                generate_events(GeneratorConfig(transactions=2000, merchants=20, days=1, seed=99)),
                0.0,
                99,
            )
        )
        pub.send(warm)
        # Warm: the sink has joined (and on Druid the supervisor's task reads and serves).
        if backend == "embedded":
            wait_for(
                lambda: bool(ingest_bench.progress(settings, registry, "olap", topic, [])),
                120,
                "the OLAP sink never committed",
            )
        else:
            wait_for(
                lambda: druid_rows(settings, registry) == len(warm),
                300,
                "Druid never served the warm-up rows",
                every_s=0.5,
            )
        log("warm")
        reader = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "ingest.py"), "--probe-reader", str(seen_file)],
            env={**os.environ, **env_of(settings)},
        )
        procs.append(reader)
        time.sleep(1.0)  # the reader's first query (imports, connection) before probes
        produced = ingest_bench.steady(pub, topic, seconds, rate)
        with contextlib.suppress(TallyError):
            wait_for(
                lambda: len(ingest_bench.read_seen(seen_file)) >= len(produced),
                60,
                "probes not all visible",
            )
    finally:
        stop(procs)
    seen = ingest_bench.read_seen(seen_file)
    lags = [(seen[t] - p) * 1000 for t, p in produced.items() if t in seen]
    log(f"freshness: {len(lags)}/{len(produced)} probes visible")
    if not lags:
        raise TallyError(f"{backend}: no probe became visible")
    return lags


# --- the run ---------------------------------------------------------------------------------


MEASURES = [
    ("ingest_olap_events_per_s", "events/s"),
    ("ingest_e2e_events_per_s", "events/s"),
    ("freshness_probes", "probes"),
    ("freshness_p50_ms", "ms"),
    ("freshness_p99_ms", "ms"),
]
ROUTES = ("sales", "sales_base", "search")


def run(scale: dict[str, Any], scale_name: str, log: Log) -> Figures:
    registry = SpecRegistry.load(builtin_spec_paths())
    figures = Figures()
    load_before = os.getloadavg()
    log(f"load average {load_before}")
    got: dict[str, dict[str, float]] = {b: {} for b in BACKENDS}
    with tempfile.TemporaryDirectory(prefix="tally-bench-druid-") as tmp_name:
        tmp = Path(tmp_name)
        # The engines first: without Java or Maven that is one line before any work.
        with engines_up(tmp / "engines", log) as engines:
            wires = generate(scale["events"])
            figures.add("ingest_events", len(wires), "events")
            figures.add("freshness_rate_events_per_s", scale["rate"], "events/s")
            latest = merged_rows(wires)
            run_id = uuid.uuid4().hex[:8]
            stores = {
                b: backend_settings(b, tmp / b, engines, f"{b[0]}{run_id}_") for b in BACKENDS
            }
            for backend, settings in stores.items():
                got[backend] |= ingest(backend, settings, registry, wires, tagged(log, backend))
            compact(stores["embedded"], registry, tagged(log, "embedded"))
            index(stores["embedded"], [stores["druid"]], log)
            merchant, searches = pick_merchant(latest)
            log(f"merchant {merchant}; keywords {searches}")
            for backend, settings in stores.items():
                got[backend] |= api(
                    backend, settings, merchant, searches, scale, tagged(log, backend)
                )
            for backend, settings in stores.items():
                got[backend] |= late_compactions(
                    backend, settings, registry, latest, scale["late_rounds"], tagged(log, backend)
                )
            for backend in BACKENDS:
                fresh = backend_settings(
                    backend, tmp / f"fresh-{backend}", engines, f"f{backend[0]}{run_id}_"
                )
                lags = freshness(
                    backend, fresh, registry, scale["steady_s"], scale["rate"], tagged(log, backend)
                )
                got[backend] |= {
                    "freshness_probes": len(lags),
                    "freshness_p50_ms": percentile(lags, 50),
                    "freshness_p99_ms": percentile(lags, 99),
                }
    for name, unit in measures(scale):
        for backend in BACKENDS:
            figures.add(f"{name}_{backend}", got[backend][name], unit)
    for backend in BACKENDS:
        base, rollup = (
            got[backend][f"api_sales_base_p99_ms_c{scale['clients'][0]}"],
            got[backend][f"api_sales_p99_ms_c{scale['clients'][0]}"],
        )
        figures.add(f"api_sales_base_vs_rollup_p99_ratio_{backend}", base / max(rollup, 1e-9), "x")
    figures.add("key_state_bytes_per_key", key_state_bytes_per_key(wires, registry), "bytes")
    figures.add("load_average_1m_start", load_before[0], "")
    figures.add("load_average_1m_end", os.getloadavg()[0], "")
    return figures


def measures(scale: dict[str, Any]) -> list[tuple[str, str]]:
    api_measures = [
        (f"api_{route}_p{q}_ms_c{c}", "ms")
        for c in scale["clients"]
        for route in ROUTES
        for q in (50, 99)
    ]
    late = [
        (f"late_{what}_p{q}_s", "s")
        for what in ("write_to_compacted", "detect_to_started", "detect_to_compacted")
        for q in (50, 99)
    ]
    return MEASURES[:2] + api_measures + late + MEASURES[2:]


def pick_merchant(latest: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """A mid-volume merchant (as bench/api.py picks) and its search keywords."""
    counts: dict[str, int] = {}
    for row in latest.values():
        counts[row["merchant_id"]] = counts.get(row["merchant_id"], 0) + 1
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    merchant = ranked[len(ranked) // 10]
    mine = sorted(
        (r for r in latest.values() if r["merchant_id"] == merchant),
        key=lambda r: (r["approved_at"], r["txn_id"]),
        reverse=True,
    )
    rows = [(r["order_name"], r["customer_name"], r.get("card_last4")) for r in mine]
    return merchant, api_bench.keywords_of(rows)


def tagged(log: Logger, backend: str) -> Logger:
    return lambda message: log(f"{backend}: {message}")


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.splitlines()[0] if __doc__ else "druid benchmark")
    p.add_argument("--events", type=int, help="messages to ingest (default: the scale's)")
    p.add_argument("--steady-s", type=int, help="seconds of steady traffic for freshness")
    args = p.parse_args(argv)
    scale = dict(SCALES[args.scale])
    if args.events:
        scale["events"] = args.events
    if args.steady_s:
        scale["steady_s"] = args.steady_s
    log = Log()
    try:
        figures = run(scale, args.scale, log)
    except TallyError as exc:  # a one-line reason, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, EngineUnavailable) else 1
    rows = [
        (name, [figures.value(f"{name}_{b}") for b in BACKENDS], unit)
        for name, unit in measures(scale)
    ]
    title = (
        f"embedded vs Druid ({args.scale}): {figures.value('ingest_events'):,} events; "
        f"freshness at a steady {scale['rate']:,} events/s for {scale['steady_s']} s"
    )
    print(format_grid(rows, BACKENDS, title))
    load = (figures.value("load_average_1m_start"), figures.value("load_average_1m_end"))
    print(f"load average (1 min) at start {load[0]}, at end {load[1]}")
    extra = {"scale_parameters": {k: v for k, v in scale.items()}, "command": sys.argv}
    path = write_results("druid", figures, args.scale, extra)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
