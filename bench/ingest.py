"""Ingestion benchmark (DESIGN §6): events/s through a real broker per sink, and
freshness (produce time → visible to a reader in another process) at a steady rate,
on the development broker (tansu) and on Apache Kafka side by side.

    python bench/ingest.py --scale small|full [--broker tansu|kafka|both]

small: 200k events, 15 s of steady traffic; full: 1M events, 60 s. Each broker runs in
a temporary data dir of its own (Kafka through ``engines``, so it needs Java, and Maven
once) and is stopped at the end whatever happened. Per-broker figures are named
``<measure>_<broker>``; without Java or Maven ``--broker both`` records the Kafka ones
as skipped, with the reason. The search sink runs twice on each broker with the same
events: into tantivy, then into a local OpenSearch (``engines``, two shards, routing by
tenant), so ``ingest_search_events_per_s`` and ``ingest_search_opensearch_events_per_s``
are side by side.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from confluent_kafka import Consumer, KafkaException, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
from bench.common import (  # noqa: E402
    Figures,
    Log,
    format_grid,
    local_opensearch,
    parser,
    percentile,
    write_results,
)
from engines.base import java_binary  # noqa: E402
from engines.devbroker import start_tansu, wait_reachable  # noqa: E402
from ingest.kafka import consumer_config, ensure_topics, translate  # noqa: E402
from producers.generate import GeneratorConfig, generate_events  # noqa: E402
from producers.malformed import Wire, encode, with_malformed  # noqa: E402
from producers.publish import Publisher  # noqa: E402
from tally.errors import EngineUnavailable, TallyError  # noqa: E402
from tally.settings import IngestSettings, SearchSettings, Settings  # noqa: E402
from tally.specs import SpecRegistry, builtin_spec_paths  # noqa: E402

SCALES = {
    "small": {"events": 200_000, "steady_s": 15},
    "full": {"events": 1_000_000, "steady_s": 60},
}
BROKERS = ("tansu", "kafka")
FRESHNESS_RATE = 5000  # events/s
# Measured once per broker and recorded as f"{measure}_{broker}".
THROUGHPUT = [
    ("ingest_olap_events_per_s", "events/s"),
    ("ingest_search_events_per_s", "events/s"),
    ("ingest_search_opensearch_events_per_s", "events/s"),
    ("ingest_both_events_per_s", "events/s"),
]
FRESHNESS = [
    ("freshness_probes", "probes"),
    ("freshness_p50_ms", "ms"),
    ("freshness_p99_ms", "ms"),
    ("freshness_committed_p50_ms", "ms"),
    ("freshness_committed_p99_ms", "ms"),
    ("freshness_search_p50_ms", "ms"),
    ("freshness_search_p99_ms", "ms"),
    ("freshness_search_opensearch_p50_ms", "ms"),
    ("freshness_search_opensearch_p99_ms", "ms"),
]
PROBE_MERCHANT = "mch_probe"
SEOUL = ZoneInfo("Asia/Seoul")
Logger = Callable[[str], None]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "TALLY_DATA_DIR": str(settings.data_dir),
        "TALLY_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
        "TALLY_SEARCH__BACKEND": settings.search.backend,
        "TALLY_SEARCH__URL": settings.search.url,
        "TALLY_SEARCH__INDEX_PREFIX": settings.search.index_prefix,
        "TALLY_SEARCH__SHARDS": str(settings.search.shards),
        "TALLY_SEARCH__REPLICAS": str(settings.search.replicas or 0),
    }


def progress(
    settings: Settings,
    registry: SpecRegistry,
    sink: str,
    topic: str,
    parts: list[int],
    probe: Consumer | None = None,
) -> int | None:
    """Messages the sink has durably committed, summed over partitions: the catalog's
    offsets for the OLAP sink, the group's committed offsets (asked through ``probe``,
    a consumer that never joins the group) for the search sink. None when the broker
    could not say just now (a fresh Kafka answers NOT_COORDINATOR while its offsets
    topic loads): ask again."""
    if sink == "olap":
        return olap_committed(settings, "payments")
    assert probe is not None, "the search sink's progress needs a probe consumer"
    try:
        committed = probe.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    except KafkaException as exc:
        error = translate(exc, "reading the search sink's committed offsets")
        if error.transient:
            return None
        raise error from exc
    return sum(max(0, tp.offset) for tp in committed)


def throughput(
    base: Settings, registry: SpecRegistry, wires: list[Wire], sinks: list[str], log: Logger
) -> dict[str, float]:
    """Publish everything first, then time each sink from its first to its last commit.

    A sink is done when its committed offsets reach the offsets the broker acknowledged
    to the publisher, never the broker's end offsets (the development broker misreports
    them). The publisher is not transactional, so those offsets are contiguous on
    either broker, with no transaction markers between them."""
    run_id = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "topic_namespace": f"b{run_id}.",
            "data_dir": base.data_dir / run_id,
            "search": base.search.model_copy(update={"index_prefix": f"b{run_id}-"}),
        }
    )
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    pub = Publisher(settings, topic)
    pub.send(wires)
    total = sum(pub.ends.values())
    parts = sorted(pub.ends)
    arg = sinks[0] if len(sinks) == 1 else "all"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tally", "ingest", "--sink", arg],
        env=env(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # One probe for the whole run: a new client per poll costs the broker a connection,
    # metadata and a coordinator lookup each time, on the cores the sinks run on.
    group = settings.group("search", "payments")
    probe = Consumer(consumer_config(settings, group)) if "search" in sinks else None
    first: dict[str, tuple[float, int]] = {}
    done: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 1800
        while len(done) < len(sinks) and time.monotonic() < deadline and proc.poll() is None:
            for sink in sinks:
                if sink in done:
                    continue
                n = progress(settings, registry, sink, topic, parts, probe)
                if n is None:
                    continue
                now = time.monotonic()
                if n > 0 and sink not in first:
                    first[sink] = (now, n)
                if n >= total:
                    done[sink] = now
            time.sleep(0.1)
    finally:
        if probe is not None:
            probe.close()
        proc.terminate()
        proc.wait(60)
    if len(done) < len(sinks):
        raise TallyError(
            f"tally ingest --sink {arg} did not commit all {total:,} messages"
            f" (exit code {proc.returncode})"
        )
    rates = {}
    for sink in sinks:
        t0, n0 = first[sink]
        rates[sink] = (total - n0) / max(1e-9, done[sink] - t0)
        log(f"{'+'.join(sinks)}: {sink} {rates[sink]:,.0f} events/s")
    return rates


def freshness(
    base: Settings, registry: SpecRegistry, seconds: int, rate: int, log: Logger
) -> tuple[list[float], list[float], list[float]]:
    """Steady ``rate`` events/s with probe payments every 100 ms; one reader process
    records when each probe becomes visible in the merged view, another when the
    search index (the backend ``base`` names) finds it."""
    run_id = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "topic_namespace": f"f{run_id}.",
            "data_dir": base.data_dir / run_id,
            "search": base.search.model_copy(update={"index_prefix": f"f{run_id}-"}),
        }
    )
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    # One process per sink, as deployed for freshness: the OLAP sink never waits for
    # the search sink's index merges (on one interpreter they share one GIL).
    ingests = [
        subprocess.Popen(
            [sys.executable, "-m", "tally", "ingest", "--sink", sink],
            env={
                **env(settings),
                **(
                    {"TALLY_INGEST__BATCH_MAX_WAIT_S": os.environ["SEARCH_WAIT"]}
                    if sink == "search" and "SEARCH_WAIT" in os.environ
                    else {}
                ),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for sink in ("olap", "search")
    ]
    # The compaction watcher keeps the hot partitions' segment counts logarithmic,
    # as in any deployment; without it every reader query grows with the run.
    ingests.append(
        subprocess.Popen(
            [sys.executable, "-m", "tally", "compaction", "watch"],
            env=env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    seen_file = settings.data_dir / "seen.tsv"
    found_file = settings.data_dir / "found.tsv"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    readers = [
        subprocess.Popen([sys.executable, __file__, flag, str(path)], env=env(settings))
        for flag, path in (("--probe-reader", seen_file), ("--probe-search", found_file))
    ]
    produced: dict[str, float] = {}
    try:
        pub = Publisher(settings, topic)
        # Warm up: wait until ingest has joined and committed something.
        pub.send(
            list(
                with_malformed(
                    generate_events(
                        GeneratorConfig(transactions=2000, merchants=20, days=1, seed=99)
                    ),
                    0.0,
                    99,
                )
            )
        )
        deadline = time.monotonic() + 60
        while not progress(settings, registry, "olap", topic, []) and time.monotonic() < deadline:
            time.sleep(0.1)
        produced = steady(pub, topic, seconds, rate)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(
            len(read_seen(seen_file)), len(read_seen(found_file))
        ) < len(produced):
            time.sleep(0.2)
    finally:
        for reader in readers:
            reader.terminate()
            reader.wait(10)
        for ingest in ingests:
            ingest.terminate()
        for ingest in ingests:
            ingest.wait(60)
    seen = read_seen(seen_file)
    lags = [(seen[t] - p) * 1000 for t, p in produced.items() if t in seen]
    log(f"freshness: {len(lags)}/{len(produced)} probes visible")
    committed = commit_times(settings)
    commit_lags = [(committed[t] - p) * 1000 for t, p in produced.items() if t in committed]
    if os.environ.get("TALLY_BENCH_DEBUG"):
        print("commit lags", " ".join(f"{x:.0f}" for x in commit_lags), file=sys.stderr)
    found = read_seen(found_file)
    search_lags = [(found[t] - p) * 1000 for t, p in produced.items() if t in found]
    log(f"freshness: {len(search_lags)}/{len(produced)} probes found by search")
    return lags, commit_lags, search_lags


def steady(pub: Publisher, topic: str, seconds: int, rate: int) -> dict[str, float]:
    """A live stream of ``rate`` events/s for ``seconds`` (today's payments in Seoul,
    landing in the active partition, the same events on every call) with a probe
    payment every 100 ms; returns each probe's id → when it was produced (epoch s)."""
    today = datetime.now(SEOUL).replace(hour=0, minute=0, second=0, microsecond=0)
    events = with_malformed(
        generate_events(
            GeneratorConfig(transactions=rate * seconds, merchants=200, days=1, start=today, seed=7)
        ),
        0.0,
        7,
    )
    produced: dict[str, float] = {}
    start = time.monotonic()
    probe = 0
    next_probe = start
    for sent, wire in enumerate(events, start=1):
        pub._producer.produce(topic, key=wire.key, value=wire.value)
        now = time.monotonic()
        if now >= next_probe:
            probe += 1
            txn = f"probe-{probe}"
            produced[txn] = time.time()
            pub._producer.produce(topic, key=txn.encode(), value=encode(probe_event(txn)))
            next_probe += 0.1
        ahead = sent / rate - (now - start)
        if ahead > 0:
            pub._producer.poll(ahead)
        elif sent % 1000 == 0:
            pub._producer.poll(0)
        if now - start > seconds:
            break
    pub._producer.flush(30)
    return produced


def commit_times(settings: Settings) -> dict[str, float]:
    """When each probe was first committed: the catalog time of the earliest segment
    (live or already replaced by compaction, whose files outlive it by the GC grace)
    holding it. Splits freshness into ingestion (produce → durable) and the reader's."""
    import sqlite3

    import duckdb

    con = sqlite3.connect(f"file:{settings.catalog_path}?mode=ro", uri=True)
    try:
        created = dict(
            con.execute("SELECT path, created_at FROM segments WHERE datasource = 'payments'")
        )
    finally:
        con.close()
    paths = [p for p in created if Path(p).exists()]
    if not paths:
        return {}
    rows = (
        duckdb.connect()
        .execute(
            "SELECT txn_id, filename FROM read_parquet($paths, filename = true) "
            "WHERE merchant_id = $merchant",
            {"paths": paths, "merchant": PROBE_MERCHANT},
        )
        .fetchall()
    )
    out: dict[str, float] = {}
    for txn, path in rows:
        out[txn] = min(out.get(txn, float("inf")), created[path])
    return out


def olap_committed(settings: Settings, datasource: str) -> int:
    """Messages of ``datasource`` the OLAP sink made durable: its catalog offsets,
    summed (topics of one run start at offset 0)."""
    from storage.embedded.catalog import Catalog

    if not settings.catalog_path.exists():
        return 0
    catalog = Catalog(settings.catalog_path, readonly=True)  # never contend for the lock
    try:
        with catalog.read():
            return sum(catalog.offsets(datasource).values())
    finally:
        catalog.close()


def probe_event(txn: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    return {
        "event_id": f"{txn}-e",
        "event_type": "payment.approved",
        "occurred_at": now,
        "txn_id": txn,
        "version": 1,
        "merchant_id": PROBE_MERCHANT,
        "order_id": txn,
        "order_name": "probe",
        "customer_name": "probe",
        "method": "CARD",
        "card_company": "SHINHAN",
        "card_last4": "0000",
        "currency": "KRW",
        "amount": 100,
        "canceled_amount": 0,
        "status": "DONE",
        "approved_at": now,
    }


def read_seen(path: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            txn, _, ts = line.partition("\t")
            if ts:
                out.setdefault(txn, float(ts))
    return out


def probe_reader(seen_file: Path) -> None:
    """Another process: poll the merged view and note when each probe first appears."""
    from sqlglot import exp

    from storage import open_reader
    from storage.sql import subquery
    from tally.settings import load_settings

    settings = load_settings(None)
    registry = SpecRegistry.load(builtin_spec_paths())
    reader = open_reader(settings, registry)
    seen: set[str] = set()
    with seen_file.open("a") as out:
        while True:
            began = time.time()
            # As the API reads: pruned to the partitions the time range touches (the
            # probes are stamped now), tenant-filtered.
            at = datetime.now(SEOUL)
            relation = reader.relation("payments", at - timedelta(hours=1), at + timedelta(hours=1))
            query = (
                exp.select("txn_id")
                .from_(subquery(relation, "m"))
                .where(exp.column("merchant_id").eq(exp.Literal.string(PROBE_MERCHANT)))
            )
            rows = reader.query(query.sql(dialect=reader.capabilities.sql_dialect)).rows
            now = time.time()
            if os.environ.get("TALLY_BENCH_DEBUG"):
                print(f"query {1000 * (now - began):.0f} ms", file=sys.stderr)
            for (txn,) in rows:
                if txn not in seen:
                    seen.add(txn)
                    out.write(f"{txn}\t{now}\n")
            out.flush()
            time.sleep(0.1)  # poll like a dashboard would, not a busy loop


def probe_search(found_file: Path) -> None:
    """Another process: ask the search index for the probe merchant's newest documents,
    as the API's hybrid search does, and note when each probe is first found."""
    from search import open_index
    from tally.settings import load_settings

    settings = load_settings(None)
    spec = SpecRegistry.load(builtin_spec_paths()).get("payments")
    index = None
    seen: set[str] = set()
    with found_file.open("a") as out:
        while True:
            try:  # the embedded index does not exist before the sink's first commit
                index = index or open_index(settings, spec, readonly=True)
                hits = index.search(PROBE_MERCHANT, "probe", limit=2000, order="time")
            except (TallyError, ValueError, OSError):
                hits = []
            now = time.time()
            for hit in hits:
                if hit.key not in seen:
                    seen.add(hit.key)
                    out.write(f"{hit.key}\t{now}\n")
            out.flush()
            time.sleep(0.1)


@contextmanager
def running_broker(name: str, data_dir: Path) -> Iterator[str]:
    """Start broker ``name`` with its files under ``data_dir``; yields its bootstrap
    address and stops it on the way out, whatever happened."""
    if name == "tansu":
        port = free_port()
        proc = start_tansu("127.0.0.1", port, data_dir / "tansu.log")
        try:
            wait_reachable(f"127.0.0.1:{port}")
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(10)
        return
    engine = engines.get(name, data_dir)
    try:
        engine.up()
        yield engine.env()["TALLY_KAFKA_BOOTSTRAP"]
    finally:
        engine.stop()


def kafka_unavailable(data_dir: Path) -> str | None:
    """Why Kafka cannot run here (no Java, no Maven for the first fetch), or None.
    Asked before anything is measured, so a missing tool costs no benchmark time."""
    try:
        java_binary()
        engines.get("kafka", data_dir).resolve()
    except EngineUnavailable as exc:
        return exc.message
    return None


def measure(
    base: Settings,
    registry: SpecRegistry,
    scale: dict[str, int],
    wires: list[Wire],
    only: str | None,
    log: Logger,
    opensearch: SearchSettings | str,
) -> dict[str, float]:
    """Every phase (or ``only`` one) on the broker ``base`` points at, by measure name.
    The search sink runs on tantivy, then on ``opensearch`` (or NaN: the reason it
    cannot run here) with the same events, one after the other."""
    out: dict[str, float] = {}
    if only in (None, "search"):
        out["ingest_search_events_per_s"] = throughput(base, registry, wires, ["search"], log)[
            "search"
        ]
        if isinstance(opensearch, SearchSettings):
            on = base.model_copy(update={"search": opensearch})
            rate = throughput(on, registry, wires, ["search"], tagged(log, "opensearch"))
            out["ingest_search_opensearch_events_per_s"] = rate["search"]
    if only == "olap" or only is None:
        out["ingest_olap_events_per_s"] = throughput(base, registry, wires, ["olap"], log)["olap"]
    if only in ("olap", "search"):
        return out
    if only is None:
        both = throughput(base, registry, wires, ["olap", "search"], log)
        out["ingest_both_events_per_s"] = min(both.values())
    lags, commit_lags, found = freshness(base, registry, scale["steady_s"], FRESHNESS_RATE, log)
    out["freshness_probes"] = len(lags)
    out["freshness_p50_ms"] = percentile(lags, 50)
    out["freshness_p99_ms"] = percentile(lags, 99)
    out["freshness_committed_p50_ms"] = percentile(commit_lags, 50)
    out["freshness_committed_p99_ms"] = percentile(commit_lags, 99)
    out["freshness_search_p50_ms"] = percentile(found, 50)
    out["freshness_search_p99_ms"] = percentile(found, 99)
    if isinstance(opensearch, SearchSettings):  # the same steady run, OpenSearch as index
        on = base.model_copy(update={"search": opensearch})
        steady_s = scale["steady_s"]
        _, _, found = freshness(on, registry, steady_s, FRESHNESS_RATE, tagged(log, "opensearch"))
        out["freshness_search_opensearch_p50_ms"] = percentile(found, 50)
        out["freshness_search_opensearch_p99_ms"] = percentile(found, 99)
    return out


def measures(only: str | None) -> list[tuple[str, str]]:
    """The (measure, unit) pairs a run with ``only`` records per broker."""
    if only in ("olap", "search"):
        return [m for m in THROUGHPUT if m[0].startswith(f"ingest_{only}_")]
    return FRESHNESS if only == "freshness" else THROUGHPUT + FRESHNESS


def side_by_side(
    figures: Figures, brokers: list[str], wanted: list[tuple[str, str]], title: str
) -> str:
    """One row per measure, a column per broker; then why any broker was skipped."""
    rows = [(m, [figures.value(f"{m}_{b}") for b in brokers], unit) for m, unit in wanted]
    reasons = {f["name"].rsplit("_", 1)[1]: f["skipped"] for f in figures if "skipped" in f}
    return "\n".join(
        [format_grid(rows, brokers, title), *(f"{b}: skipped, {r}" for b, r in reasons.items())]
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__ or "ingest benchmark")
    p.add_argument("--probe-reader", type=Path, help=argparse_hidden())
    p.add_argument("--probe-search", type=Path, help=argparse_hidden())
    p.add_argument(
        "--only",
        choices=["olap", "search", "freshness"],
        help="run one phase; prints, writes no results",
    )
    p.add_argument(
        "--broker",
        choices=[*BROKERS, "both"],
        default="both",
        help="the broker(s) to measure (default: both, side by side)",
    )
    args = p.parse_args(argv)
    if args.probe_reader:
        probe_reader(args.probe_reader)
        return 0
    if args.probe_search:
        probe_search(args.probe_search)
        return 0
    try:
        return run(args.scale, args.broker, args.only)
    except TallyError as exc:  # a one-line reason, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, EngineUnavailable) else 1


def run(scale_name: str, which: str, only: str | None) -> int:
    scale = SCALES[scale_name]
    brokers = list(BROKERS) if which == "both" else [which]
    wanted = measures(only)
    log = Log()
    registry = SpecRegistry.load(builtin_spec_paths())
    figures = Figures()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tally-bench-ingest-")))
        skipped: dict[str, str] = {}
        if "kafka" in brokers and (reason := kafka_unavailable(tmp / "kafka")) is not None:
            if brokers == ["kafka"]:
                raise EngineUnavailable(f"kafka unavailable: {reason}")
            skipped["kafka"] = reason
            log(f"kafka: skipped, {reason}")
        wires: list[Wire] = []
        if only != "freshness":
            log(f"generating {scale['events']:,} events")
            config = GeneratorConfig(
                transactions=int(scale["events"] * 0.92), merchants=500, days=30, seed=1
            )
            wires = list(with_malformed(generate_events(config), 0.001, 1))
            figures.add("ingest_events", len(wires), "events")
        if only in (None, "freshness"):
            figures.add("freshness_rate_events_per_s", FRESHNESS_RATE, "events/s")
        search: SearchSettings | str = "not measured in this phase"
        if only in (None, "search", "freshness"):
            search = stack.enter_context(local_opensearch(tmp / "opensearch", log, shards=2))
        for broker in brokers:
            if broker in skipped:
                for name, unit in wanted:
                    figures.skip(f"{name}_{broker}", unit, skipped[broker])
                continue
            with running_broker(broker, tmp / broker) as bootstrap:
                log(f"{broker}: up at {bootstrap}")
                base = Settings(
                    data_dir=tmp / broker, kafka_bootstrap=bootstrap, ingest=IngestSettings()
                )
                got = measure(base, registry, scale, wires, only, tagged(log, broker), search)
            for name, unit in wanted:
                if name in got:
                    figures.add(f"{name}_{broker}", got[name], unit)
                elif isinstance(search, str):
                    figures.skip(f"{name}_{broker}", unit, search)
    title = f"ingest{f' {only}' if only else ''} ({scale_name})"
    if wires:
        title += f": {len(wires):,} events"
    if only in (None, "freshness"):
        title += f"; freshness at a steady {FRESHNESS_RATE:,} events/s"
    print(side_by_side(figures, brokers, wanted, title))
    if only:
        return 0
    path = write_results("ingest", figures, scale_name)
    log(f"wrote {path}")
    return 0


def tagged(log: Logger, broker: str) -> Logger:
    """``log`` with each line prefixed by the broker it is about."""
    return lambda message: log(f"{broker}: {message}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
