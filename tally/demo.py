"""``tally demo``: the platform end to end on the embedded default.

Starts the development broker (unless one already answers), creates the topics,
streams realistic payments — late cancellations into old partitions, duplicates,
out-of-order versions, malformed messages — and the merchants' API access logs (a
second datasource, sampled 10% into search), runs both sinks and the compaction
watcher, serves the query API (``tally serve`` in a child process), creates an API
key for the busiest merchant and hands over the URL and key once everything answers.
Ctrl-C (or ``--duration``) stops everything cleanly, the broker it started included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from tally.errors import InvalidArgument
from tally.settings import Settings
from tally.specs import SpecRegistry


def _config(rate: float, seed: int, zone: tzinfo) -> Any:
    """The last 30 calendar days in the datasource's zone, today included: what a
    dashboard asks for. UTC's days would put the first events streamed outside that
    window for the hours when the zone's today is UTC's tomorrow (15:00–24:00 UTC in
    Seoul), and the demo would show no sales at first."""
    from producers.generate import GeneratorConfig

    today = datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    return GeneratorConfig(
        transactions=int(rate * 3600),
        merchants=50,
        days=30,
        start=today - timedelta(days=29),
        seed=seed,
    )


def busiest_merchant(rate: float, seed: int, zone: tzinfo) -> str:
    """The merchant the stream favours most (the demo key's merchant)."""
    from producers.generate import PaymentGenerator

    gen = PaymentGenerator(_config(rate, seed, zone))
    return str(gen.merchant_ids[int(gen.merchant_p.argmax())])


def _stream(
    settings: Settings, registry: SpecRegistry, rate: float, stop: threading.Event, seed: int
) -> None:
    from producers.generate import generate_events
    from producers.malformed import with_malformed
    from producers.publish import Publisher

    spec = registry.get("payments")
    config = _config(rate, seed, spec.tz)
    wires = with_malformed(generate_events(config), 0.002, seed)

    def until_stopped() -> Any:
        for wire in wires:
            if stop.is_set():
                return
            yield wire

    Publisher(settings, settings.topic(spec.datasource.topic)).send(until_stopped(), rate=rate)


def _stream_access_logs(
    settings: Settings, registry: SpecRegistry, rate: float, stop: threading.Event, seed: int
) -> None:
    """The merchants' API access logs beside their payments (the ``access_logs`` spec:
    all of them in OLAP, a 10% sample in the search index), at half the payments' rate."""
    from producers.access_logs import AccessLogConfig, generate_access_logs
    from producers.malformed import Wire, encode
    from producers.publish import Publisher

    spec = registry.get("access_logs")
    payments = _config(rate, seed, registry.get("payments").tz)
    config = AccessLogConfig(requests=int(rate * 1800), payments=payments, seed=seed)

    def until_stopped() -> Any:
        for event in generate_access_logs(config):
            if stop.is_set():
                return
            yield Wire(event["request_id"].encode(), encode(event), None)

    Publisher(settings, settings.topic(spec.datasource.topic)).send(until_stopped(), rate=rate / 2)


def _stream_settlements(
    settings: Settings, registry: SpecRegistry, rate: float, stop: threading.Event, seed: int
) -> None:
    """The settlements of the streamed payments (the ``settlements`` spec), in the order
    the settlement domain publishes them: hours to days after each payment. About two
    per payment, so twice the payments' rate keeps them in step."""
    from producers.malformed import with_malformed
    from producers.publish import Publisher
    from producers.settlements import stream_settlements

    spec = registry.get("settlements")
    payments = _config(rate, seed, registry.get("payments").tz)
    wires = with_malformed(stream_settlements(payments), 0.002, seed, spec=spec)

    def until_stopped() -> Any:
        for wire in wires:
            if stop.is_set():
                return
            yield wire

    Publisher(settings, settings.topic(spec.datasource.topic)).send(until_stopped(), rate=rate * 2)


def summary(settings: Settings, registry: SpecRegistry) -> dict[str, Any]:
    from rollups.request import AggregateRequest
    from rollups.router import run
    from storage import open_reader

    spec = registry.get("payments")
    reader = open_reader(settings, registry)
    try:
        rows = reader.query("SELECT count(*), count(DISTINCT merchant_id) FROM payments").rows[0]
        local_today = datetime.now(spec.tz).replace(hour=0, minute=0, second=0, microsecond=0)
        req = AggregateRequest(
            start=local_today - timedelta(days=29),
            end=local_today + timedelta(days=1),
            granularity="month",
            group_by=("currency",),
        )
        routed, sales = run(reader, spec, req)
        fresh = reader.freshness(spec.name)
    finally:
        reader.close()
    return {
        "transactions": rows[0],
        "merchants": rows[1],
        "olap_freshness": fresh.isoformat() if fresh else None,
        "sales_30d": [
            dict(
                zip(
                    [
                        "bucket",
                        "currency",
                        "count",
                        "gross_amount",
                        "canceled_amount",
                        "net_amount",
                    ],
                    r,
                    strict=True,
                )
            )
            for r in sales.rows
        ],
        "sales_source": routed.source,
    }


@dataclass(frozen=True)
class Ready:
    """What the demo hands over once everything answers."""

    url: str
    api_key: str
    merchant_id: str
    admin_key: str  # for the operator console


def _watch(settings: Settings, registry: SpecRegistry, stop: threading.Event) -> None:
    from compaction.watcher import Watcher
    from storage import open_store

    store = open_store(settings, registry)
    try:
        Watcher(settings, registry, store).run(stop)
    finally:
        store.close()


def _serve(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    """``tally serve`` in a child process, with exactly this process's settings."""
    from tally.settings import HANDOFF_ENV, handoff

    return subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "1"],
        env={**os.environ, HANDOFF_ENV: handoff(settings)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches the demo, which stops the server itself
    )


def _port(settings: Settings, wanted: int | None) -> int:
    """``wanted`` (or api.port) if free, else any free port: a demo should not fail
    because something else uses 8000."""
    for port in (wanted if wanted is not None else settings.api.port, 0):
        with socket.socket() as sock:
            try:
                sock.bind((settings.api.host, port))
            except OSError:
                if wanted is not None:
                    raise InvalidArgument(f"port {wanted} is in use") from None
                continue
            return int(sock.getsockname()[1])
    raise AssertionError("unreachable")


def _tansu(settings: Settings) -> tuple[Settings, Callable[[], object] | None]:
    """The development broker on ``kafka_bootstrap``, unless something answers there.

    It keeps its topics in memory: one started here begins empty, so whatever an
    earlier demo stored in the data directory is of a log that no longer exists (its
    positions would be refused, ``ingest.positions``): that state is cleared first,
    and the demo says so."""
    from engines.devbroker import DevBroker, reachable

    if reachable(settings.kafka_bootstrap):
        return settings, None
    cleared = clear_previous_run(settings)
    if cleared:
        print(
            f"the development broker starts empty: cleared the previous demo's"
            f" {', '.join(cleared)} in {settings.data_dir}",
            file=sys.stderr,
        )
    broker = DevBroker(settings)
    broker.up()
    return settings, broker.down


def clear_previous_run(settings: Settings) -> list[str]:
    """Remove what ingestion, compaction and the API stored in the data directory (API
    keys stay; the demo makes new ones); returns the names removed."""
    names = ["segments", "search", "catalog.sqlite", "compaction-runs.sqlite", "ratelimit.sqlite"]
    removed = []
    for name in names:
        for path in [settings.data_dir / name, *settings.data_dir.glob(f"{name}-*")]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            if name not in removed:
                removed.append(name)
    return removed


def _kafka(settings: Settings) -> tuple[Settings, Callable[[], object] | None]:
    """Apache Kafka as ``tally engines up kafka`` runs it, under the demo's data dir; the
    demo then talks to it whatever ``kafka_bootstrap`` said."""
    import engines

    engine = engines.get("kafka", settings.data_dir)
    was_running = engine.running() is not None
    engine.up()
    bootstrap = engine.env()["TALLY_KAFKA_BOOTSTRAP"]
    return settings.model_copy(update={"kafka_bootstrap": bootstrap}), (
        None if was_running else engine.stop
    )


BROKERS: dict[str, Callable[[Settings], tuple[Settings, Callable[[], object] | None]]] = {
    "tansu": _tansu,
    "kafka": _kafka,
}


_Workers = dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]  # thread name → target, args


def _forward(source: threading.Event, target: threading.Event) -> None:
    source.wait()
    target.set()


def run_demo(
    settings: Settings,
    registry: SpecRegistry,
    *,
    broker: str = "tansu",
    rate: float,
    duration: float | None,
    seed: int,
    report: Callable[[dict[str, Any]], None],
    ready: Callable[[Ready], None],
    port: int | None = None,
) -> dict[str, Any]:
    from ingest.kafka import ensure_topics
    from ingest.service import run_ingest
    from query_api.keys import KeyStore
    from query_api.ready import wait_ready

    stop = threading.Event()
    # Ctrl-C and SIGTERM (docker stop, systemd) only ask everything to stop; the
    # cleanup below then stops each part after what depends on it: the streams, the
    # ingesters, the watcher, the server, then the broker.
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    # Each stage's threads watch their own event; they are stopped in this order.
    stages: list[tuple[threading.Event, list[threading.Thread]]] = []
    server: subprocess.Popen[bytes] | None = None
    stop_broker: Callable[[], object] | None = None
    try:
        settings, stop_broker = BROKERS[broker](settings)
        ensure_topics(settings, registry)
        streams, ingest, watch = threading.Event(), threading.Event(), threading.Event()
        plan: list[tuple[threading.Event, _Workers]] = [
            (
                streams,
                {
                    "demo-publisher": (_stream, (settings, registry, rate, streams, seed)),
                    "demo-access-logs": (
                        _stream_access_logs,
                        (settings, registry, rate, streams, seed),
                    ),
                    "demo-settlements": (
                        _stream_settlements,
                        (settings, registry, rate, streams, seed),
                    ),
                },
            ),
            (
                ingest,
                {
                    "demo-ingest": (
                        run_ingest,
                        (settings, list(registry), ["olap", "search"], ingest),
                    )
                },
            ),
            (watch, {"demo-watcher": (_watch, (settings, registry, watch))}),
        ]
        stages = [
            (
                event,
                [
                    threading.Thread(target=target, args=args, name=name, daemon=True)
                    for name, (target, args) in workers.items()
                ],
            )
            for event, workers in plan
        ]
        # An ingester that stops by itself (a terminal error) stops the demo too.
        threading.Thread(target=_forward, args=(ingest, stop), daemon=True).start()
        for _event, threads in stages:
            for t in threads:
                t.start()
        merchant = busiest_merchant(rate, seed, registry.get("payments").tz)
        with KeyStore(settings.keys_path) as keys:
            _, key = keys.create(merchant)
            _, admin_key = keys.create(None, admin=True)
        chosen = _port(settings, port)
        url = f"http://{settings.api.host}:{chosen}"
        server = _serve(settings, chosen)
        wait_ready(url, server, stop=stop)
        if stop.is_set():
            return {}
        ready(Ready(url, key, merchant, admin_key))
        deadline = None if duration is None else time.monotonic() + duration
        last: dict[str, Any] = {}
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            stop.wait(min(5.0, max(0.1, (deadline or float("inf")) - time.monotonic())))
            last = summary(settings, registry)
            report(last)
        return last
    except KeyboardInterrupt:
        return {}
    finally:
        stop.set()
        for event, threads in stages:
            event.set()
            for t in threads:
                t.join(60)
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        if stop_broker is not None:
            stop_broker()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
