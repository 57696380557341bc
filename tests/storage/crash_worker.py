"""Subprocess side of the crash-safety and concurrent-reader tests.

Run as ``python -m tests.storage.crash_worker <role> <data_dir> [options]`` from the
repository root. Two roles:

``write``
    Opens the store, resumes at the batch after the stored offset and loops forever:
    commit batch ``i`` (offsets ``i*N .. (i+1)*N`` on one topic partition), then
    compact every fragmented partition and collect garbage. It prints one line per
    step (``COMMIT_BEGIN i``, ``COMMIT_DONE i <end> <ms>``, ``COMPACT_BEGIN ...``,
    ``COMPACT_DONE ... <ms>``, ``GC_BEGIN``, ``GC_DONE``) and flushes each, so the
    parent knows what was durably committed and when to pull the trigger (SIGKILL).
    ``COMMIT_DONE`` is printed only after ``commit`` returned, i.e. after the
    catalog transaction committed.

    ``--pause-at <phase>:<point> --pause-nth K`` makes the worker stop, on the K-th
    time it reaches that point, and wait on stdin to be killed. The points wrap real
    store methods and only *pause* after (or before) them; nothing is replaced:
    ``files_written`` (segment files written and fsynced, catalog untouched),
    ``catalog_updated`` (inside the catalog transaction, everything inserted, not
    committed), ``catalog_committed`` (right after any catalog write transaction
    committed), ``returned`` (commit/compact returned, not yet acknowledged) and
    ``gc:removing`` (expired segment rows forgotten and committed, their files not
    yet removed).

``read``
    Opens a reader and queries in a loop, printing one JSON line per observation
    (the generation it saw and a fingerprint from ONE SQL statement over the merged
    view and both rollup views, so all of it comes from a single snapshot), or
    ``{"error": ...}``. It stops after the observation that follows the appearance
    of ``--stop-file``.

The batches are deterministic (:func:`batch_rows`), so the parent can rebuild the
expected state for any committed prefix with the naive reference in
``tests.factories``. The tests import this module too: the batches, the fingerprint
and its expected values, the reference comparisons and :class:`Proc`, the parent's
handle on a worker, live here so both sides share one definition.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from storage.embedded.catalog import Catalog
from storage.embedded.compactor import EmbeddedCompactor
from storage.embedded.reader import EmbeddedReader
from storage.embedded.segments import SegmentWrites
from storage.embedded.store import EmbeddedStore
from storage.protocol import CommitResult, OffsetRange
from tally.settings import Settings, StoreSettings
from tally.specs import DatasourceSpec, SpecRegistry, builtin_spec_paths
from tests.factories import METHODS, T0, latest_by_key, normalise, payment, reference_rollup

TP = ("payments.v1", 0)
ROWS_PER_BATCH = 8  # one Kafka message per row: batch i covers offsets i*8 .. (i+1)*8
MERCHANTS = ("m1", "m2", "m3")

# --- deterministic batches ------------------------------------------------------------

_batches: list[list[dict[str, Any]]] = []
_latest: dict[str, dict[str, Any]] = {}
_keys: list[list[str]] = []
_first: dict[str, dict[str, Any]] = {}  # key → its very first event (v1), as delivered


def _emit(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    rows.append(row)
    _first.setdefault(row["txn_id"], row)
    have = _latest.get(row["txn_id"])
    if have is None or (row["version"], row["event_id"]) > (have["version"], have["event_id"]):
        _latest[row["txn_id"]] = row


def _successor(txn: str, **change: Any) -> dict[str, Any]:
    """The next version of ``txn``'s latest state, with ``change`` applied."""
    old = _latest[txn]
    fields = {
        "merchant_id": old["merchant_id"],
        "approved_at": old["approved_at"],
        "amount": old["amount"],
        "canceled_amount": old["canceled_amount"],
        "method": old["method"],
    }
    fields.update(change)
    return payment(txn, old["version"] + 1, **fields)


def _generate(i: int) -> list[dict[str, Any]]:
    """Batch ``i``: new payments spread over two Seoul days, plus (from batch 2 on) a
    cancellation of a recent payment, a late cancellation into an old partition, a
    payment that moves partition (sometimes into the previous month) or tenant
    (tombstones), and alternately a stale redelivery or an equal-version twin with a
    greater event id."""
    day = T0 + timedelta(days=i // 3)
    rows: list[dict[str, Any]] = []
    new = ROWS_PER_BATCH if i < 2 else ROWS_PER_BATCH - 4
    keys = []
    for j in range(new):
        txn = f"k{i:03d}-{j}"
        keys.append(txn)
        _emit(
            rows,
            payment(
                txn,
                merchant_id=MERCHANTS[(i + j) % 3],
                method=METHODS[(i + 2 * j) % len(METHODS)],
                amount=(1 + (i * 7 + j * 3) % 20) * 1000,
                # T0 is 09:00 in Seoul: +15h and later falls on the next Seoul day.
                approved_at=day + timedelta(hours=5 * j + 2 * (i % 3), minutes=(7 * i) % 60),
            ),
        )
    _keys.append(keys)
    if i >= 2:
        # A (partial, then full) cancellation of a payment of the previous batch.
        txn = _keys[i - 1][i % 4]
        old = _latest[txn]
        _emit(
            rows,
            _successor(txn, canceled_amount=min(old["amount"], old["canceled_amount"] + 3000)),
        )
        # A late cancellation into an old partition.
        txn = _keys[i // 2][(3 * i) % len(_keys[i // 2])]
        old = _latest[txn]
        _emit(
            rows,
            _successor(txn, canceled_amount=min(old["amount"], old["canceled_amount"] + 1000)),
        )
        # A payment that moves: partition (one day on, or into December) or tenant.
        txn = _keys[i - 2][(i + 1) % 4]
        old = _latest[txn]
        if i % 2 == 0:
            moved = (
                old["approved_at"] + timedelta(days=1)
                if i % 3
                else T0 - timedelta(days=1, hours=i % 5)
            )
            _emit(rows, _successor(txn, approved_at=moved))
        else:
            other = MERCHANTS[(MERCHANTS.index(old["merchant_id"]) + 1) % 3]
            _emit(rows, _successor(txn, merchant_id=other))
        if i % 2 == 0:
            # A redelivered old event: not newer than what is stored, so dropped.
            txn = _keys[i - 1][0]
            _emit(rows, dict(_first[txn]))
        else:
            # Same version, greater event id: wins whatever the arrival order.
            txn = _keys[i - 2][i % 4]
            old = _latest[txn]
            twin = dict(old, event_id=old["event_id"] + "-b", method=METHODS[i % len(METHODS)])
            twin["card_company"] = "SHINHAN" if twin["method"] == "CARD" else None
            twin["card_last4"] = "4242" if twin["method"] == "CARD" else None
            _emit(rows, twin)
    assert len(rows) == ROWS_PER_BATCH
    return rows


def batch_rows(i: int) -> list[dict[str, Any]]:
    """The rows of batch ``i`` (fresh copies)."""
    while len(_batches) <= i:
        _batches.append(_generate(len(_batches)))
    return [dict(r) for r in _batches[i]]


def rows_upto(n: int) -> list[dict[str, Any]]:
    """Every row of batches ``0 .. n-1``."""
    return [row for i in range(n) for row in batch_rows(i)]


def batch_offsets(i: int) -> dict[tuple[str, int], OffsetRange]:
    return {TP: OffsetRange(i * ROWS_PER_BATCH, (i + 1) * ROWS_PER_BATCH)}


def batch_now(i: int) -> datetime:
    """The wall clock batch ``i`` is committed at (makes old-partition writes late)."""
    return T0 + timedelta(days=i // 3, hours=12)


def commit_batch(store: EmbeddedStore, i: int) -> CommitResult:
    return store.commit("payments", batch_rows(i), batch_offsets(i), now=batch_now(i))


# --- shared helpers --------------------------------------------------------------------


def make_settings(data_dir: Path, *, gc_grace_s: float, orphan_grace_s: float) -> Settings:
    return Settings(
        data_dir=data_dir,
        store=StoreSettings(gc_grace_s=gc_grace_s, orphan_grace_s=orphan_grace_s),
    )


def load_registry() -> SpecRegistry:
    return SpecRegistry.load(builtin_spec_paths())


def fragmented_partitions(store: EmbeddedStore) -> list[tuple[str, str, list[int]]]:
    """(datasource, partition, live segment ids in commit order) with >= 2 segments."""
    parts: dict[tuple[str, str], list[int]] = {}
    for seg in store.live_segments():  # ordered by seq
        parts.setdefault((seg.datasource, seg.partition), []).append(seg.id)
    return [(ds, p, ids) for (ds, p), ids in sorted(parts.items()) if len(ids) >= 2]


def compaction_round(
    store: EmbeddedStore,
    round_no: int,
    before: Callable[[str, str], None] = lambda ds, p: None,
    after: Callable[[str, str, float], None] = lambda ds, p, ms: None,
) -> int:
    """Compact every fragmented partition. On odd rounds a base partition of three or
    more segments compacts only its two newest (not a prefix, so its tombstones must
    survive); otherwise the whole partition. Every third round then packs the base
    partitions held in one segment (earlier packs included) into one file."""
    done = 0
    for ds, part, ids in fragmented_partitions(store):
        chosen = ids[-2:] if round_no % 2 and ds == "payments" and len(ids) >= 3 else None
        before(ds, part)
        started = time.perf_counter()
        store.compactor.compact(ds, part, chosen)
        after(ds, part, (time.perf_counter() - started) * 1000)
        done += 1
    live = store.live_segments("payments")
    parts = Counter(s.partition for s in live)
    single = [s.id for s in live if parts[s.partition] == 1]
    if round_no % 3 == 2 and len(single) >= 2:
        before("payments", "pack")
        started = time.perf_counter()
        store.compactor.pack("payments", single)
        after("payments", "pack", (time.perf_counter() - started) * 1000)
        done += 1
    return done


# --- the reader's fingerprint ------------------------------------------------------------

_SEOUL = "'Asia/Seoul'"


def _bucket(granularity: str) -> str:
    return f"timezone({_SEOUL}, date_trunc('{granularity}', timezone({_SEOUL}, approved_at)))"


def _mismatches(rollup: str, granularity: str, dims: list[str]) -> str:
    """Groups where the rollup view disagrees with the merged base view."""
    keys = ", ".join(["bucket", *dims])
    return f"""(
        SELECT count(*) FROM (
            SELECT {_bucket(granularity)} AS bucket, {", ".join(dims)},
                   count(*) AS "count", sum(amount) AS gross_amount,
                   sum(canceled_amount) AS canceled_amount,
                   sum(amount - canceled_amount) AS net_amount
            FROM payments GROUP BY ALL
        ) b FULL OUTER JOIN {rollup} r USING ({keys})
        WHERE b."count" IS DISTINCT FROM r."count"
           OR b.gross_amount IS DISTINCT FROM r.gross_amount
           OR b.canceled_amount IS DISTINCT FROM r.canceled_amount
           OR b.net_amount IS DISTINCT FROM r.net_amount
    )"""


FINGERPRINT_COLUMNS = (
    "rows",
    "keys",
    "max_batch",
    "gross",
    "canceled",
    "versions",
    "daily_groups",
    "daily_count",
    "daily_gross",
    "daily_canceled",
    "daily_net",
    "hourly_groups",
    "hourly_count",
    "hourly_gross",
    "hourly_canceled",
    "hourly_net",
    "daily_mismatches",
    "hourly_mismatches",
)

FINGERPRINT_SQL = f"""
SELECT
    (SELECT count(*) FROM payments),
    (SELECT count(DISTINCT txn_id) FROM payments),
    (SELECT coalesce(max(CAST(substr(txn_id, 2, 3) AS INTEGER)), -1) FROM payments),
    (SELECT coalesce(sum(amount), 0) FROM payments),
    (SELECT coalesce(sum(canceled_amount), 0) FROM payments),
    (SELECT coalesce(sum(version), 0) FROM payments),
    (SELECT count(*) FROM payments_daily),
    (SELECT coalesce(sum("count"), 0) FROM payments_daily),
    (SELECT coalesce(sum(gross_amount), 0) FROM payments_daily),
    (SELECT coalesce(sum(canceled_amount), 0) FROM payments_daily),
    (SELECT coalesce(sum(net_amount), 0) FROM payments_daily),
    (SELECT count(*) FROM payments_hourly),
    (SELECT coalesce(sum("count"), 0) FROM payments_hourly),
    (SELECT coalesce(sum(gross_amount), 0) FROM payments_hourly),
    (SELECT coalesce(sum(canceled_amount), 0) FROM payments_hourly),
    (SELECT coalesce(sum(net_amount), 0) FROM payments_hourly),
    {_mismatches("payments_daily", "day", ["merchant_id", "currency"])},
    {_mismatches("payments_hourly", "hour", ["merchant_id", "method", "status", "currency"])}
"""


def expected_fingerprint(spec: DatasourceSpec, n: int) -> tuple[int, ...]:
    """What :data:`FINGERPRINT_SQL` must return once exactly batches ``0 .. n-1`` are
    visible, computed from the naive reference model."""
    latest = latest_by_key(spec, rows_upto(n))
    rows = list(latest.values())
    out = [
        len(rows),
        len(latest),
        max((int(k[1:4]) for k in latest), default=-1),
        sum(r["amount"] for r in rows),
        sum(r["canceled_amount"] for r in rows),
        sum(r["version"] for r in rows),
    ]
    for name in ("payments_daily", "payments_hourly"):
        groups = reference_rollup(spec, name, latest)
        out.append(len(groups))
        out.extend(sum(v[i] for v in groups.values()) for i in range(4))
    return (*out, 0, 0)


# --- reference comparison ----------------------------------------------------------------


def merged_rows(reader: EmbeddedReader, spec: DatasourceSpec) -> dict[str, tuple[Any, ...]]:
    cols = list(spec.columns)
    quoted = ", ".join(f'"{c}"' for c in cols)
    rows = reader.query(f"SELECT {quoted} FROM payments").rows
    key = cols.index(spec.datasource.key)
    out: dict[str, tuple[Any, ...]] = {}
    for r in rows:
        assert r[key] not in out, f"key {r[key]} appears twice in the merged view"
        out[r[key]] = tuple(normalise(v) for v in r)
    return out


def expected_merged(
    spec: DatasourceSpec, latest: Mapping[str, Mapping[str, Any]]
) -> dict[str, tuple[Any, ...]]:
    return {k: tuple(normalise(row[c]) for c in spec.columns) for k, row in latest.items()}


def rollup_rows(
    reader: EmbeddedReader, spec: DatasourceSpec, name: str
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    rollup = spec.rollup(name)
    keys = ["bucket", *rollup.dimensions]
    metrics = [m.name for m in spec.parsed_metrics]
    cols = ", ".join(f'"{c}"' for c in keys + metrics)
    out: dict[tuple[Any, ...], tuple[int, ...]] = {}
    for r in reader.query(f"SELECT {cols} FROM {name}").rows:
        group = tuple(normalise(v) for v in r[: len(keys)])
        assert group not in out, f"group {group} appears twice in {name}"
        out[group] = tuple(r[len(keys) :])
    return out


def expected_rollup(
    spec: DatasourceSpec, name: str, latest: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    return {
        tuple(normalise(v) for v in k): v for k, v in reference_rollup(spec, name, latest).items()
    }


# --- the parent's handle on a subprocess ---------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


class Proc:
    """A worker subprocess (this module, run with the current interpreter: the venv's)
    whose stdout lines are drained by a thread, so the pipe never fills and the parent
    can wait for a line with a timeout."""

    def __init__(self, role: str, data_dir: Path, *args: str, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("w")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "tests.storage.crash_worker", role, str(data_dir), *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.endswith("\n"):  # a SIGKILL can cut the last line short: not a report
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """Consume lines until one satisfies ``predicate``; fail on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"worker printed nothing expected within {timeout}s; last lines "
                    f"{self.lines[-5:]}; stderr:\n{self.stderr()}"
                ) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(
                    f"worker exited ({self.popen.wait()}) early; last lines {self.lines[-5:]};"
                    f" stderr:\n{self.stderr()}"
                )
            self.lines.append(line)
            if predicate(line):
                return line

    def count(self, prefix: str) -> int:
        return sum(1 for line in self.lines if line.startswith(prefix))

    def wait_for_nth(self, prefix: str, nth: int, timeout: float = 60.0) -> str:
        """Wait for the ``nth`` line (counting from the start) beginning with ``prefix``."""
        return self.wait_for(
            lambda ln: ln.startswith(prefix) and self.count(prefix) >= nth, timeout
        )

    def rest(self) -> list[str]:
        """After the process ended: every line it printed."""
        self._thread.join(timeout=30)
        while True:
            line = self._queue.get(timeout=30)
            if line is None:
                self._queue.put(None)
                return self.lines
            self.lines.append(line)

    def sigkill(self) -> list[str]:
        """SIGKILL the worker (it must still be running); return all it printed."""
        assert self.popen.poll() is None, (
            f"worker died by itself ({self.popen.returncode}); stderr:\n{self.stderr()}"
        )
        os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=30) == -signal.SIGKILL
        return self.rest()

    def close(self) -> None:
        """Kill if still running (a failed test) and release the pipes."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._thread.join(timeout=30)  # it reaches EOF now that the process is gone
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                pipe.close()
        self._stderr.close()


# --- the subprocess roles -------------------------------------------------------------------


def _say(*parts: object) -> None:
    print(*parts, flush=True)


class _Pauser:
    """Stops the process at ``<phase>:<point>`` the ``nth`` time it is reached, until
    the parent kills it. Wraps real methods; their behaviour is unchanged."""

    def __init__(self, target: str | None, nth: int) -> None:
        self.target = target
        self.nth = nth
        self.phase = "idle"
        self.seen: Counter[str] = Counter()
        if target is not None:
            self._install()

    def point(self, name: str) -> None:
        where = f"{self.phase}:{name}"
        if where != self.target:
            return
        self.seen[where] += 1
        if self.seen[where] == self.nth:
            _say("PAUSED", where)
            sys.stdin.readline()  # the parent SIGKILLs us; EOF means it went away
            os._exit(3)

    def _install(self) -> None:
        pauser = self
        wait = SegmentWrites.wait
        bump = Catalog.bump_generation
        remove = EmbeddedCompactor._remove_files
        write = Catalog.write

        @contextmanager
        def write_then_pause(self: Catalog) -> Iterator[sqlite3.Connection]:
            with write(self) as con:
                yield con
            pauser.point("catalog_committed")

        def wait_then_pause(self: SegmentWrites) -> Any:
            result = wait(self)
            pauser.point("files_written")
            return result

        def bump_then_pause(self: Catalog) -> None:
            bump(self)
            pauser.point("catalog_updated")

        def pause_then_remove(paths: Any) -> int:
            pauser.point("removing")
            return remove(paths)

        SegmentWrites.wait = wait_then_pause  # type: ignore[method-assign]
        Catalog.bump_generation = bump_then_pause  # type: ignore[method-assign]
        EmbeddedCompactor._remove_files = staticmethod(pause_then_remove)  # type: ignore[method-assign]
        Catalog.write = write_then_pause  # type: ignore[method-assign]


def run_writer(data_dir: Path, pause_at: str | None, pause_nth: int) -> None:
    pauser = _Pauser(pause_at, pause_nth)
    # Replaced files go at the next GC; crash orphans stay for the parent to find.
    settings = make_settings(data_dir, gc_grace_s=0.0, orphan_grace_s=3600.0)
    store = EmbeddedStore(settings, load_registry())
    start = store.stored_offsets("payments").get(TP, 0)
    assert start % ROWS_PER_BATCH == 0, start
    i = start // ROWS_PER_BATCH
    batch_rows(i + 20)  # generate ahead: no generation work inside the kill window
    _say("READY", i)

    def before(ds: str, part: str) -> None:
        pauser.phase = "compact"
        _say("COMPACT_BEGIN", ds, part)

    def after(ds: str, part: str, ms: float) -> None:
        pauser.point("returned")
        pauser.phase = "idle"
        _say("COMPACT_DONE", ds, part, f"{ms:.2f}")

    while True:
        pauser.phase = "commit"
        _say("COMMIT_BEGIN", i)
        started = time.perf_counter()
        commit_batch(store, i)
        elapsed = (time.perf_counter() - started) * 1000
        pauser.point("returned")
        pauser.phase = "idle"
        _say("COMMIT_DONE", i, (i + 1) * ROWS_PER_BATCH, f"{elapsed:.2f}")
        compaction_round(store, i, before, after)
        pauser.phase = "gc"
        _say("GC_BEGIN")
        store.compactor.collect_garbage()
        pauser.phase = "idle"
        _say("GC_DONE")
        i += 1


def run_reader(data_dir: Path, stop_file: Path) -> None:
    settings = make_settings(data_dir, gc_grace_s=0.0, orphan_grace_s=3600.0)
    reader = EmbeddedReader(settings, load_registry())
    first = True
    while True:
        stopping = stop_file.exists()
        started = time.perf_counter()
        try:
            cur = reader.cursor()  # refreshes the views, then pins this generation
            generation = reader.snapshot.generation
            try:
                row = cur.execute(FINGERPRINT_SQL).fetchone()
            finally:
                cur.close()
            assert row is not None
            record: dict[str, Any] = {
                "gen": generation,
                "fp": list(row),
                "ms": round((time.perf_counter() - started) * 1000, 2),
            }
        except Exception as exc:
            record = {"error": f"{type(exc).__name__}: {exc}"}
        _say(json.dumps(record))
        if first:
            _say("READY")
            first = False
        if stopping:
            _say("END")
            return


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="crash_worker")
    parser.add_argument("role", choices=["write", "read"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--pause-at")
    parser.add_argument("--pause-nth", type=int, default=1)
    parser.add_argument("--stop-file", type=Path)
    args = parser.parse_args(argv)
    if args.role == "write":
        run_writer(args.data_dir, args.pause_at, args.pause_nth)
    else:
        assert args.stop_file is not None, "--stop-file is required for the read role"
        run_reader(args.data_dir, args.stop_file)


if __name__ == "__main__":
    main()
