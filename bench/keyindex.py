"""The writer's key index at scale: bytes a key, resident memory, batch cost, start-up.

Feeds the index the work a commit gives it — fingerprint a 50k-row batch, look it up,
apply the version guard, write the accepted rows (80% new keys, 20% updates to keys
already held, as with late cancellations) — until it holds ``--scale`` keys
(small 1M, full 10M, huge 100M), and measures at every tenfold step:

- batch rows/s at that size (the commit cost must not grow with the store): the
  median batch of the last 20, and amortised over the whole decade (every batch from
  the previous step on, the merges of runs included);
- the arrays' bytes a key and the process's resident memory;
- start-up: writing the snapshot and loading it back.

Beside it, in the same run, the dict-of-tuples index it replaced holds the first
million of the same keys, so the bytes-a-key comparison is measured, not recalled.

Then the whole commit, not the index alone: an embedded store is filled through
``store.commit`` (500k-row batches of new payments, all columns) to a tenth of
``--scale`` and to all of it, and at each size 50 commits of 10k rows (80% new keys,
20% updates of keys spread over 90 days) are timed: ``commit_rows_per_s_at_<n>``,
whose ratio is the growth of commit cost with the store.

    .venv/bin/python bench/keyindex.py --scale small|full|huge
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figures, Log, format_table, write_results
from storage import open_store
from storage.embedded import keysnapshot
from storage.embedded.keyindex import KeyIndex
from tally.settings import Settings
from tally.specs import SpecRegistry, builtin_spec_paths

NAME = "keyindex"
SIZES = {"small": 1_000_000, "full": 10_000_000, "huge": 100_000_000}
BATCH = 50_000
UPDATES = 0.2
_T0_US = 1_780_000_000_000_000  # 2026-05-28, microseconds
_DAY_US = 86_400_000_000


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def batch(first: int, keys: np.ndarray, version: int, rng: np.random.Generator) -> pa.Table:
    """Payments state for ``keys`` (numbers): merchants, methods and amounts drawn."""
    n = len(keys)
    ids = pa.array(keys, pa.int64())
    txn = pc.binary_join_element_wise("txn_", pc.utf8_lpad(pc.cast(ids, pa.string()), 12, "0"), "")
    event = pc.binary_join_element_wise(
        "evt-", pc.cast(pa.array(first + np.arange(n), pa.int64()), pa.string()), f"-v{version}", ""
    )
    merchants = pc.binary_join_element_wise(
        "m", pc.cast(pa.array(keys % 10_000, pa.int64()), pa.string()), ""
    )
    methods = np.array(["CARD", "TRANSFER", "VIRTUAL_ACCOUNT", "MOBILE", "EASY_PAY"])
    statuses = np.array(["DONE", "PARTIAL_CANCELED", "CANCELED"])
    amount = rng.integers(1, 500, n) * 100
    days = (keys % 90).astype(np.int64)
    return pa.table(
        {
            "txn_id": txn,
            "version": pa.array(np.full(n, version, np.int64)),
            "event_id": event,
            "merchant_id": merchants,
            "approved_at": pa.array(_T0_US + days * _DAY_US + (keys % 86_400) * 1_000_000).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "method": pa.array(methods[keys % 5]),
            "status": pa.array(statuses[(keys % 2 + 1) * (version > 1)]),
            "currency": pa.array(np.full(n, "KRW")),
            "amount": pa.array(amount),
            "canceled_amount": pa.array(amount if version > 1 else np.zeros(n, np.int64)),
        }
    )


def full_rows(table: pa.Table, version: int) -> pa.Table:
    """``batch``'s state with every other payments column, as the store wants rows."""
    n = table.num_rows
    txn = table.column("txn_id")
    etype = "payment.approved" if version == 1 else "payment.canceled"
    extra = {
        "event_type": pa.array(np.full(n, etype)),
        "occurred_at": table.column("approved_at"),
        "order_id": pc.binary_join_element_wise("ord_", txn, ""),
        "order_name": pa.array(np.full(n, "Coffee beans 1kg")),
        "customer_name": pa.array(np.full(n, "Kim Minji")),
        "card_company": pa.array(np.full(n, "SHINHAN")),
        "card_last4": pc.utf8_slice_codeunits(txn, -4),
    }
    for name, values in extra.items():
        table = table.append_column(name, values)
    return table


def commit_at_scale(total: int, figures: Figures, log: Log) -> None:
    """Commit rows/s of 10k-row batches at a tenth of ``total`` keys and at ``total``."""
    spec_name = "payments"
    rng = np.random.default_rng(11)
    now = datetime.fromtimestamp((_T0_US + 91 * _DAY_US) / 1e6, UTC)
    with tempfile.TemporaryDirectory(prefix="tally-bench-commit-") as where:
        settings = Settings(data_dir=Path(where))
        registry = SpecRegistry.load(builtin_spec_paths())
        store = open_store(settings, registry)
        held, fill = 0, 500_000
        measured: list[float] = []
        try:
            for size in (total // 10, total):
                start = time.perf_counter()
                filled = held
                while held < size:
                    n = min(fill, size - held)
                    store.commit(
                        spec_name,
                        full_rows(batch(held, np.arange(held, held + n), 1, rng), 1),
                        now=now,
                    )
                    held += n
                took = time.perf_counter() - start
                # The measured commits must not pay for the fill's writeback (gigabytes
                # at 100M), which would slow their fsyncs: flush it first.
                os.sync()
                label = _label(size)
                figures.add(f"store_fill_rows_per_s_to_{label}", (held - filled) / took, "rows/s")
                rates = []
                for i in range(50):
                    fresh = np.arange(held, held + 8_000)
                    old = np.unique(rng.integers(0, held, 2_000))
                    table = pa.concat_tables(
                        [
                            full_rows(batch(held, fresh, 1, rng), 1),
                            full_rows(batch(10**13 + held, old, 2 + i, rng), 2),
                        ]
                    )
                    start = time.perf_counter()
                    store.commit(spec_name, table, now=now)
                    rates.append(table.num_rows / (time.perf_counter() - start))
                    held += len(fresh)
                rate = float(np.median(rates))
                measured.append(figures.add(f"commit_rows_per_s_at_{label}", rate, "rows/s"))
                log(f"store at {label}: {rate:,.0f} commit rows/s (10k-row batches, 20% updates)")
        finally:
            store.close()
    first, last = _label(total // 10), _label(total)
    figures.add(f"commit_rate_{last}_over_{first}", measured[1] / measured[0], "ratio")


def _label(keys: int) -> str:
    return f"{keys // 1_000_000}M" if keys >= 1_000_000 else f"{keys // 1_000}k"


def apply(index: KeyIndex, table: pa.Table) -> int:
    """What a commit asks of the index; returns the rows accepted."""
    new = index.encode(table)
    slots = index.find(new["h1"], new["h2"])
    stored = index.gather(slots, ["version", "eprefix", "ehash"])
    accept = index.newer(new, slots, stored, lambda rows: np.ones(len(rows), np.bool_))
    index.update(slots.take(accept), {n: a[accept] for n, a in new.items()})
    return int(accept.sum())


def dict_bytes_a_key(table: pa.Table) -> float:
    """The replaced index: a dict of (version, event_id, partition, tenant, state)."""
    gc.collect()
    before = rss_mb()
    columns = [table.column(c).to_pylist() for c in table.column_names]
    cols = dict(zip(table.column_names, columns, strict=True))
    entries: dict[str, Any] = {}
    interned: dict[str, str] = {}
    for i, key in enumerate(cols["txn_id"]):
        merchant = interned.setdefault(cols["merchant_id"][i], cols["merchant_id"][i])
        state = (
            int(cols["approved_at"][i].timestamp() * 1e6),
            merchant,
            interned.setdefault(cols["method"][i], cols["method"][i]),
            interned.setdefault(cols["status"][i], cols["status"][i]),
            interned.setdefault(cols["currency"][i], cols["currency"][i]),
            cols["amount"][i],
            cols["canceled_amount"][i],
        )
        entries[key] = (cols["version"][i], cols["event_id"][i], "2026-05-28", merchant, state)
    del columns, cols
    gc.collect()
    grown = (rss_mb() - before) * 2**20 / len(entries)
    del entries
    gc.collect()
    return grown


def index_at_scale(total: int, figures: Figures, log: Log) -> None:
    """The index alone: bytes a key, batch cost at each tenfold step, snapshot."""
    rng = np.random.default_rng(7)
    spec = SpecRegistry.load(builtin_spec_paths()).get("payments")

    sample = batch(0, np.arange(min(total, 1_000_000)), 1, rng)
    figures.add("dict_index_bytes_a_key", dict_bytes_a_key(sample), "B")
    del sample

    base_rss = rss_mb()
    figures.add("rss_mb_before_index", base_rss, "MB")
    index = KeyIndex(spec)
    held = 0
    checkpoint = 1_000_000
    window: list[float] = []
    decade = [0.0, 0.0]  # rows, seconds since the previous step
    while held < total:
        fresh = min(int(BATCH * (1 - UPDATES)) if held else BATCH, total - held)
        keys = np.arange(held, held + fresh)
        tables = [batch(held, keys, 1, rng)]
        if held:
            old = rng.integers(0, held, BATCH - fresh)
            tables.append(batch(10**12 + held, np.unique(old), 2 + held // BATCH, rng))
        start = time.perf_counter()
        for table in tables:
            apply(index, table)
        took = time.perf_counter() - start
        rows = sum(t.num_rows for t in tables)
        window.append(rows / took)
        decade[0] += rows
        decade[1] += took
        held += fresh
        if held >= checkpoint or held >= total:
            label = f"{held // 1_000_000}M"
            rate = float(np.median(window[-20:]))
            figures.add(f"batch_rows_per_s_at_{label}", rate, "rows/s")
            figures.add(f"amortised_rows_per_s_to_{label}", decade[0] / decade[1], "rows/s")
            decade = [0.0, 0.0]
            figures.add(f"bytes_a_key_at_{label}", index.nbytes / len(index), "B")
            figures.add(f"index_rss_mb_at_{label}", rss_mb() - base_rss, "MB")
            log(f"{label}: {rate:,.0f} rows/s, {index.nbytes / len(index):.1f} B/key")
            checkpoint *= 10
    figures.add("runs_at_end", len(index.runs), "runs")
    # The resident peak while the index grew (its merges included), before the
    # snapshot phase's own allocations.
    figures.add("peak_rss_mb_while_filling", _peak_mb(), "MB")

    with tempfile.TemporaryDirectory(prefix="tally-bench-keyindex-") as where:
        start = time.perf_counter()
        keysnapshot.save(Path(where), index, identity=1)
        figures.add("snapshot_save_s", time.perf_counter() - start, "s")
        figures.add("snapshot_mb", (Path(where) / "payments.npz").stat().st_size / 2**20, "MB")
        del index
        gc.collect()
        # Warm: the file still in the page cache, as after a clean restart. Cold: its
        # pages dropped first (synced, then DONTNEED), as after a reboot.
        for kind in ("warm", "cold"):
            if kind == "cold":
                _drop_from_page_cache(Path(where) / "payments.npz")
            start = time.perf_counter()
            loaded = keysnapshot.load(Path(where), spec, identity=1, repairs=0, seq=10**12)
            figures.add(f"startup_snapshot_load_{kind}_s", time.perf_counter() - start, "s")
            assert loaded is not None and len(loaded) == total
            del loaded
            gc.collect()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=tuple(SIZES), default="small")
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--index-only", action="store_true", help="skip the whole-commit phase")
    phase.add_argument("--commit-only", action="store_true", help="only the whole-commit phase")
    args = p.parse_args(argv)
    total = SIZES[args.scale]
    log = Log()
    figures = Figures()
    if not args.commit_only:
        index_at_scale(total, figures, log)
    figures.add("peak_rss_mb", _peak_mb(), "MB")
    if not args.index_only:
        commit_at_scale(total, figures, log)
        if args.commit_only:  # the process was the store's writer alone
            figures.add("peak_rss_mb_store_writer", _peak_mb(), "MB")

    path = write_results(NAME, figures, args.scale, {"keys": total})
    print(format_table(figures, f"bench/{NAME} --scale {args.scale}"))
    log(f"wrote {path}")
    return 0


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    sys.exit(main())
