"""Query API benchmark: latency per route at 1 and 8 concurrent clients.

A store of generated payments (1M at --scale full, with 10% cancellations, some of
them late) and its tantivy index are built through the store and index APIs, then
`tally serve` runs with two uvicorn workers (the machine has two cores) and clients
in this process call each route with one merchant's key:

* sales        — /v1/sales, 90 days by day (rollup-routed) and the same forced to base
                 (``force_base`` is admin tooling: that one is asked with an admin key)
* list         — /v1/transactions, the newest page of 50
* search       — /v1/transactions?q=<keyword> (hybrid: index proposes, store disposes),
                 keywords drawn from the merchant's own data (see ``keywords``)
* get          — /v1/transactions/{txn_id} of a random existing id
* sql          — /v1/sql, a per-status count for the merchant

Then, where a local OpenSearch can run (``engines``: Java, and Maven once), the same
rows are indexed into it (three shards, routing by tenant) and a second ``tally serve``
with ``search.backend = "opensearch"`` answers the same search requests:
``api_search_opensearch_*`` beside ``api_search_*``, in the same run.

p50/p99 per route and concurrency; ``api_max_p99_ms_c8`` is the worst route at 8
clients (the forced-base comparison included); ``api_sales_rollup_speedup`` is the
forced-base p99 over the rollup p99 at 1 client. The per-key rate limit is set far
above what the clients send, so every request pays for its counting but none is refused.

    .venv/bin/python bench/api.py --scale small|full [--data-dir DIR]

``--data-dir`` keeps the built store there and reuses it on the next run (when
profiling one route, the minutes of building are paid once).
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot

from bench.common import (
    Figures,
    Log,
    build_once,
    format_table,
    local_opensearch,
    parser,
    percentile,
    write_results,
)
from compaction.watcher import Watcher
from producers.generate import GeneratorConfig, approval_tables, cancellations_for
from query_api.keys import KeyStore
from query_api.ready import wait_ready
from search import Doc, open_index
from search.tantivy_index import TantivyIndex
from storage import open_reader, open_store
from storage.embedded.store import EmbeddedStore
from tally.settings import Settings
from tally.specs import SpecRegistry, builtin_spec_paths
from tally.timeutil import utc_datetimes

SCALES = {
    "small": {"transactions": 200_000, "requests": 100},
    "full": {"transactions": 1_000_000, "requests": 200},
}
DAYS = 120
SHARDS = 6
START = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(hours=9)  # Seoul midnight


def keywords(reader: Any, merchant: str) -> list[str]:
    """What a merchant types into a dashboard's search box, from its own data: a
    product word matching many rows, a customer's full name (a few), a card's last
    four digits, an English name, a surname of one syllable (shorter than the index's
    grams: the store scans) and a word it never sold (nothing)."""
    rows = reader.query(
        "SELECT order_name, customer_name, card_last4 FROM payments WHERE merchant_id = ?"
        " ORDER BY approved_at DESC, txn_id",
        [merchant],
    ).rows
    return keywords_of(rows)


def keywords_of(rows: list[Any]) -> list[str]:
    """``keywords`` from a merchant's (order_name, customer_name, card_last4) rows,
    newest first."""
    words = [
        w
        for r in rows
        for w in str(r[0]).split()
        if len(w) >= 2 and w.isalpha() and not w.isascii()
    ]
    product = max(sorted(set(words)), key=words.count)
    korean = [str(r[1]) for r in rows if not str(r[1]).isascii()]
    customer = korean[len(korean) // 2]
    last4 = next(str(r[2]) for r in rows if r[2])
    english = next(
        (w for r in rows for w in str(r[1]).split() if w.isascii() and len(w) >= 3), "Kim"
    )
    unsold = next(w for w in ("운동화", "Wool coat", "항공권", "Espresso") if w not in words)
    return [product, customer, last4, english, customer[0], unsold]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(settings: Settings, registry: SpecRegistry, n: int, log: Log) -> None:
    """Store and index n payments (and cancellations of 10% of them)."""
    spec = registry.get("payments")
    ds = spec.datasource
    store = open_store(settings, registry)
    index = TantivyIndex(settings, spec)
    config = GeneratorConfig(transactions=n, merchants=500, days=DAYS, start=START, seed=5)
    rng = np.random.default_rng(5)
    done = 0
    for table in approval_tables(config, 20_000):
        now = pc.max(table.column(ds.time)).as_py()
        picked = table.take(pa.array(np.flatnonzero(rng.random(table.num_rows) < 0.1)))
        cancels = cancellations_for(picked, now, seed=done)
        store.commit(
            "payments", pa.concat_tables([table, cancels.select(table.schema.names)]), now=now
        )
        _index(index, table, ds)
        done += table.num_rows
        if done % 200_000 == 0:
            log(f"built {done:,}")
    # The API is measured on the store as the platform keeps it: the watcher has
    # compacted the partitions the late cancellations wrote into.
    compact_as_the_watcher_would(settings, registry, store, log)
    index.close()
    store.close()


def _index(index: TantivyIndex, table: pa.Table, ds: Any) -> None:
    cols = {
        c: table.column(c).to_pylist()
        for c in (ds.key, ds.tenant, ds.version, ds.event_id, *ds.searchable)
    }
    times = utc_datetimes(table.column(ds.time))
    shards: dict[int, list[Doc]] = {}
    for i, key in enumerate(cols[ds.key]):
        doc = Doc(
            key=key,
            tenant=cols[ds.tenant][i],
            time=times[i],
            version=cols[ds.version][i],
            event_id=cols[ds.event_id][i],
            text={f: cols[f][i] for f in ds.searchable},
        )
        shards.setdefault(zlib.crc32(key.encode()) % SHARDS, []).append(doc)
    for shard, docs in shards.items():
        index.upsert(shard, docs)
        index.commit(shard, max(d.time for d in docs))


def index_into_opensearch(settings: Settings, registry: SpecRegistry, log: Log) -> None:
    """Every stored payment's latest version into the index ``settings`` name, read
    back from the store (so a reused store gets its OpenSearch index too)."""
    spec = registry.get("payments")
    ds = spec.datasource
    fields = [ds.key, ds.tenant, ds.time, ds.version, ds.event_id, *ds.searchable]
    reader = open_reader(settings, registry)
    rows = reader.query(sqlglot.select(*fields).from_(spec.name).sql()).rows
    reader.close()
    index = open_index(settings, spec)
    started = time.perf_counter()
    try:
        for i in range(0, len(rows), 5000):
            docs = [
                Doc(
                    key=r[0],
                    tenant=r[1],
                    time=r[2],
                    version=r[3],
                    event_id=r[4],
                    text=dict(zip(ds.searchable, r[5:], strict=True)),
                )
                for r in rows[i : i + 5000]
            ]
            index.upsert(0, docs)
        index.commit(0, max(r[2] for r in rows))
    finally:
        index.close()
    took = time.perf_counter() - started
    log(f"opensearch: indexed {len(rows):,} docs in {took:.0f} s ({len(rows) / took:,.0f}/s)")


def serve(
    settings: Settings, port: int, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """``tally serve`` over ``settings.data_dir``; ``env``: more settings (a backend)."""
    import os

    return subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "2"],
        env={
            **os.environ,
            "TALLY_DATA_DIR": str(settings.data_dir),
            "TALLY_API__RATE_LIMIT": "1000000/second",
            **(env or {}),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def measure(
    url: str,
    key: str,
    request: Callable[[httpx.Client, random.Random], httpx.Response],
    clients: int,
    total: int,
) -> list[float]:
    """``total`` requests spread over ``clients`` threads, each with its own connection."""
    times: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        # TCP_NODELAY on the client too, as browsers and curl set it.
        transport = httpx.HTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        )
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60, transport=transport) as c:
            request(c, rng)  # warm this connection
            for _ in range(total // clients):
                t0 = time.perf_counter()
                resp = request(c, rng)
                elapsed = (time.perf_counter() - t0) * 1000
                if resp.status_code != 200:
                    errors.append(resp.text[:200])
                with lock:
                    times.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return times


def main(argv: list[str] | None = None) -> int:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--data-dir", type=Path, help="build the store here once, then reuse it")
    args = cli.parse_args(argv)
    scale = SCALES[args.scale]
    log = Log()
    registry = SpecRegistry.load(builtin_spec_paths())
    figures = Figures()
    with contextlib.ExitStack() as stack:
        data_dir = args.data_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="tally-bench-api-"))
        )
        settings = Settings(data_dir=data_dir)
        n = scale["transactions"]
        build_once(data_dir, "api", n, lambda: build(settings, registry, n, log), log)
        figures.add("api_stored_transactions", scale["transactions"], "rows")
        reader = open_reader(settings, registry)
        merchant = mid_volume_merchant(reader)
        mine = [
            r[0]
            for r in reader.query(
                "SELECT txn_id FROM payments WHERE merchant_id = ?", [merchant]
            ).rows
        ]
        searches = keywords(reader, merchant)
        reader.close()
        log(f"merchant {merchant}: {len(mine):,} payments; keywords {searches}")
        keys = KeyStore(settings.keys_path)
        _, key = keys.create(merchant)
        _, admin_key = keys.create(None, admin=True)
        keys.close()
        port = free_port()
        server = serve(settings, port)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, server, timeout_s=120)
            end = START + timedelta(days=DAYS)
            sales = {
                "from": (end - timedelta(days=90)).isoformat(),
                "to": end.isoformat(),
                "granularity": "day",
            }
            routes: dict[str, Callable[[httpx.Client, random.Random], httpx.Response]] = {
                "sales": lambda c, r: c.get("/v1/sales", params=sales),
                "sales_base": lambda c, r: c.get(
                    "/v1/sales", params={**sales, "force_base": "true", "merchant": merchant}
                ),
                "list": lambda c, r: c.get("/v1/transactions", params={"limit": 50}),
                "search": lambda c, r: c.get(
                    "/v1/transactions", params={"q": r.choice(searches), "limit": 50}
                ),
                "get": lambda c, r: c.get(f"/v1/transactions/{r.choice(mine)}"),
                "sql": lambda c, r: c.post(
                    "/v1/sql",
                    json={
                        "sql": "SELECT status, COUNT(*) FROM payments GROUP BY status",
                        "dialect": "mysql",
                    },
                ),
            }
            p99: dict[tuple[str, int], float] = {}
            for clients in (1, 8):
                for name, request in routes.items():
                    who = admin_key if name == "sales_base" else key
                    times = measure(url, who, request, clients, scale["requests"])
                    figures.add(f"api_{name}_p50_ms_c{clients}", percentile(times, 50), "ms")
                    p99[(name, clients)] = figures.add(
                        f"api_{name}_p99_ms_c{clients}", percentile(times, 99), "ms"
                    )
                    log(f"{name} c{clients}: p99 {p99[(name, clients)]:.1f} ms")
            figures.add("api_sales_p99_ms_c1", p99[("sales", 1)], "ms")
            figures.add("api_search_p99_ms_c1", p99[("search", 1)], "ms")
            figures.add("api_max_p99_ms_c8", max(v for (_, c), v in p99.items() if c == 8), "ms")
            figures.add("api_sales_rollup_speedup", p99[("sales_base", 1)] / p99[("sales", 1)], "x")
        finally:
            server.terminate()
            server.wait(30)
        search = stack.enter_context(local_opensearch(data_dir / "opensearch", log, shards=3))
        for clients in (1, 8):
            for q in (50, 99):
                name = f"api_search_opensearch_p{q}_ms_c{clients}"
                if isinstance(search, str):
                    figures.skip(name, "ms", search)
        if not isinstance(search, str):
            on = settings.model_copy(update={"search": search})
            index_into_opensearch(on, registry, log)
            port = free_port()
            env = {f"TALLY_SEARCH__{k.upper()}": str(v) for k, v in search.model_dump().items()}
            server = serve(on, port, {k: v for k, v in env.items() if v != "None"})
            try:
                wait_ready(url := f"http://127.0.0.1:{port}", server, timeout_s=120)
                for clients in (1, 8):
                    times = measure(url, key, routes["search"], clients, scale["requests"])
                    for q in (50, 99):
                        name = f"api_search_opensearch_p{q}_ms_c{clients}"
                        figures.add(name, percentile(times, q), "ms")
                    log(f"search on opensearch c{clients}: p99 {percentile(times, 99):.1f} ms")
            finally:
                server.terminate()
                server.wait(30)
    print(format_table(figures, f"bench/api --scale {args.scale}"))
    path = write_results("api", figures, args.scale)
    log(f"wrote {path}")
    return 0


def mid_volume_merchant(reader: Any) -> str:
    """The merchant at the 10th percentile by payments, as in bench/store.py."""
    ranked = reader.query(
        "SELECT merchant_id, sum(count) FROM payments_daily GROUP BY 1 ORDER BY 2 DESC, 1"
    ).rows
    return str(ranked[len(ranked) // 10][0])


def compact_as_the_watcher_would(
    settings: Settings, registry: SpecRegistry, store: Any, log: Callable[[str], None]
) -> None:
    """Run the compaction watcher until nothing is due, its clock a day ahead (past
    every debounce): the embedded store as the platform keeps it."""
    assert isinstance(store, EmbeddedStore)
    later = datetime.now(UTC) + timedelta(days=1)
    watcher = Watcher(settings, registry, store, clock=lambda: later)
    while watcher.tick():
        pass
    log(f"compacted: {watcher.report.compactions} partitions")


if __name__ == "__main__":
    sys.exit(main())
