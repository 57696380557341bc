"""The writer's primary-key index: key → latest (version, event id, tenant, state).

Like a StarRocks primary-key table's index it lives in memory; unlike a separate
durable structure it is *derived*: segments are the only truth, so the index is
rebuilt from the live segments when a writer starts (or loaded from a snapshot that
names the catalog state it reflects, then caught up), and before every commit it
catches up with segments other writers committed since it last looked (under the
catalog write lock, so nothing can slip in between). A crash therefore never leaves
the index and the data disagreeing, and two ingest processes can share a datasource.

What it holds per key, in NumPy arrays (payments: 63 bytes a key, against ~450 for a
dict of tuples): a 96-bit key fingerprint, the version, the event id's first 8 bytes
and a 32-bit hash of it (``fingerprint``), the tenant's code, and the rollup state
(``keycodes``). The partition is not stored: it is the calendar bucket of the
state's time.

The arrays form a few *runs*, each sorted by fingerprint, merged like a binary
counter (a run absorbs the next when it is no larger): a key is moved about
log2(keys / batch) times in its life, a lookup is one ``searchsorted`` per run, and
a key that already exists is updated in place. Commit-time work is therefore
vectorised and proportional to the batch, never to the store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
from sqlglot import exp

from storage.calendar import partitions_of
from storage.embedded.fingerprint import event_order, key_fingerprints
from storage.embedded.keycodes import Codes, decode_state, encode_state, state_columns
from storage.embedded.sqlgen import DIALECT, Read, merged_base
from storage.sql import col, subquery
from tally.specs import DatasourceSpec

Array = npt.NDArray[Any]
Columns = dict[str, Array]
# The exact stored (version, event id) of keys, read from the partitions named: asked
# only when a version ties and the ids share their first 8 bytes but not their hash.
Resolver = Callable[[DatasourceSpec, Sequence[str], Sequence[str]], dict[str, tuple[int, str]]]
_ABSENT = -1
_TS = pa.timestamp("us", tz="UTC")
# A run this long or shorter is searched with ``searchsorted`` (it fits in cache);
# a longer one through its directory: one slot per ``_PER_SLOT`` keys on average.
_SMALL_RUN = 1 << 16
_PER_SLOT = 8
_CHUNK = 1 << 22  # rows a directory count reads at a time


@dataclass
class Slots:
    """Where each looked-up key lives: its run (−1: absent) and position."""

    run: npt.NDArray[np.int16]
    pos: npt.NDArray[np.int64]

    @property
    def found(self) -> npt.NDArray[np.bool_]:
        return self.run >= 0

    def take(self, which: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> Slots:
        """The slots a mask selects, or those at the given positions, in their order."""
        return Slots(self.run[which], self.pos[which])


class KeyIndex:
    def __init__(self, spec: DatasourceSpec) -> None:
        self.spec = spec
        self.state = state_columns(spec)
        self.seq = -1  # the catalog seq this index reflects
        self.repairs = 0  # the catalog's repair count it was loaded under
        self.codes: dict[str, Codes] = {"tenant": Codes()}
        self.runs: list[Columns] = []
        # Per run, by position: its h1 array and where each leading-bits slot starts.
        self._directories: dict[int, tuple[Array, Array, int]] = {}

    def __len__(self) -> int:
        return sum(len(r["h1"]) for r in self.runs)

    @property
    def nbytes(self) -> int:
        """The arrays' bytes, the runs' directories included."""
        runs = sum(a.nbytes for r in self.runs for a in r.values())
        return runs + sum(d.nbytes for _h, d, _s in self._directories.values())

    # --- encoding ---------------------------------------------------------------------

    def encode(self, table: pa.Table) -> Columns:
        """The index's arrays for ``table``'s rows (identity and state columns)."""
        ds = self.spec.datasource
        h1, h2 = key_fingerprints(table.column(ds.key))
        prefix, ehash = event_order(table.column(ds.event_id))
        tenants = self.codes["tenant"]
        out: Columns = {
            "h1": h1,
            "h2": h2,
            "version": np.asarray(table.column(ds.version), np.int64),
            "eprefix": prefix,
            "ehash": ehash,
            "tenant": tenants.encode(table.column(ds.tenant)).astype(np.uint32),
        }
        for column in self.state:
            out.update(encode_state(column, table.column(column.name), self.codes))
        return out

    # --- lookup -----------------------------------------------------------------------

    def find(self, h1: Array, h2: Array) -> Slots:
        """The slot of each fingerprint (absent where no run holds it)."""
        n = len(h1)
        run_of = np.full(n, _ABSENT, np.int16)
        pos = np.zeros(n, np.int64)
        if not n or not self.runs:
            return Slots(run_of, pos)
        # Sorted needles walk each run once; a run is asked only for the needles no
        # run has matched yet (a key lives in one run).
        waiting = np.argsort(h1, kind="stable")
        for r, run in enumerate(self.runs):
            hs = run["h1"]
            if not len(hs) or not len(waiting):
                continue
            needles = h1[waiting]
            at = np.minimum(self._search(r, hs, needles), len(hs) - 1)
            hit = np.flatnonzero(hs[at] == needles)
            if not len(hit):
                continue
            match = run["h2"][at[hit]] == h2[waiting[hit]]
            for i in np.flatnonzero(~match):  # another key with the same first hash
                j, needle, second = int(at[hit[i]]), needles[hit[i]], h2[waiting[hit[i]]]
                while j < len(hs) and hs[j] == needle:
                    if run["h2"][j] == second:
                        match[i], at[hit[i]] = True, j
                        break
                    j += 1
            got = hit[match]
            run_of[waiting[got]] = r
            pos[waiting[got]] = at[got]
            waiting = np.delete(waiting, got)
        return Slots(run_of, pos)

    def _search(self, r: int, hs: Array, needles: Array) -> npt.NDArray[np.int64]:
        """``searchsorted(hs, needles)`` for sorted needles. A long run is searched
        through its directory, which narrows each needle to the few keys sharing its
        leading bits (the hashes are uniform): one cache miss a needle instead of the
        ~log2(n) of a binary search over the whole run, which made lookups at 100M
        keys three times slower than at 2M."""
        if len(hs) <= _SMALL_RUN:
            return np.searchsorted(hs, needles).astype(np.int64)
        held = self._directories.get(r)
        if held is None or held[0] is not hs:
            held = self._directories[r] = (hs, *_directory(hs))
        _hs, starts, shift = held
        slot = (needles >> np.uint64(shift)).astype(np.intp)
        lo, hi = starts[slot].astype(np.int64), starts[slot + 1].astype(np.int64)
        while True:
            open_ = lo < hi
            if not open_.any():
                return lo
            mid = (lo + hi) >> 1
            below = hs[np.minimum(mid, len(hs) - 1)] < needles
            lo = np.where(open_ & below, mid + 1, lo)
            hi = np.where(open_ & ~below, mid, hi)

    def gather(self, slots: Slots, names: Sequence[str] | None = None) -> Columns:
        """The stored arrays of found slots, aligned with them (zeros where absent)."""
        out: Columns = {}
        if not self.runs:
            return {name: np.zeros(len(slots.run), np.int64) for name in names or ()}
        for name in list(self.runs[0]) if names is None else names:
            dtype = np.result_type(*(r[name].dtype for r in self.runs))
            values = np.zeros(len(slots.run), dtype)
            for r, run in enumerate(self.runs):
                here = slots.run == r
                if here.any():
                    values[here] = run[name][slots.pos[here]]
            out[name] = values
        return out

    def newer(
        self,
        new: Columns,
        slots: Slots,
        stored: Columns,
        tie: Callable[[npt.NDArray[np.int64]], npt.NDArray[np.bool_]],
    ) -> npt.NDArray[np.bool_]:
        """Rows whose (version, event id) is greater than the stored key's; ``tie``
        decides the rows (indices) whose versions and id prefixes are equal but whose
        id hashes differ (different ids: only their full text orders them)."""
        found = slots.found
        v, sv = new["version"], stored["version"]
        p, sp = new["eprefix"], stored["eprefix"]
        accept: npt.NDArray[np.bool_] = ~found | (v > sv) | ((v == sv) & (p > sp))
        unsure = np.flatnonzero(found & (v == sv) & (p == sp) & (new["ehash"] != stored["ehash"]))
        if len(unsure):
            accept[unsure] = tie(unsure)
        return accept

    def contains(self, keys: Sequence[str]) -> npt.NDArray[np.bool_]:
        return self.find(*key_fingerprints(pa.array(list(keys), pa.string()))).found

    def partitions(self, slots: Slots) -> pa.Array:
        """The partition of each found slot: the calendar bucket of its stored time."""
        ds = self.spec.datasource
        times = self.gather(slots, [f"s:{ds.time}"])[f"s:{ds.time}"]
        return partitions_of(pa.array(times, pa.int64()).cast(_TS), ds.granularity, ds.timezone)

    def locate(self, keys: Sequence[str]) -> dict[str, str]:
        """key → partition for the keys the index holds."""
        slots = self.find(*key_fingerprints(pa.array(list(keys), pa.string())))
        found = slots.found
        parts = self.partitions(slots.take(found)).to_pylist()
        return dict(zip([k for k, f in zip(keys, found, strict=True) if f], parts, strict=True))

    def tenants(self, slots: Slots) -> pa.Array:
        return self.codes["tenant"].decode(self.gather(slots, ["tenant"])["tenant"], pa.string())

    def state_table(self, slots: Slots, schema: pa.Schema) -> pa.Table:
        """The stored rollup states of found slots, in ``schema`` (time as timestamp)."""
        arrays = self.gather(slots)
        return pa.Table.from_arrays(
            [
                decode_state(c, arrays, arrays["tenant"], self.codes, schema.field(c.name).type)
                for c in self.state
            ],
            schema=schema,
        )

    # --- change -----------------------------------------------------------------------

    def update(self, slots: Slots, new: Columns) -> None:
        """Write ``new`` rows: in place where the key is held, as a new run where not."""
        self._widen(new)
        found = slots.found
        for r, run in enumerate(self.runs):
            here = slots.run == r
            if here.any():
                at = slots.pos[here]
                for name, values in new.items():
                    run[name][at] = values[here]
        fresh = ~found
        if fresh.any():
            rows = {name: values[fresh] for name, values in new.items()}
            order = np.argsort(rows["h1"], kind="stable")
            self._add_run({name: values[order] for name, values in rows.items()})

    def _widen(self, new: Columns) -> None:
        for name, values in new.items():
            for run in self.runs:
                if np.can_cast(run[name].dtype, values.dtype) and run[name].dtype != values.dtype:
                    run[name] = run[name].astype(values.dtype)
                elif run[name].dtype != values.dtype:
                    new[name] = values.astype(run[name].dtype)

    def _add_run(self, run: Columns) -> None:
        self.runs.append(run)
        while len(self.runs) > 1 and len(self.runs[-2]["h1"]) <= len(self.runs[-1]["h1"]):
            self._merge_last()

    def compact(self) -> None:
        """Merge every run into one (before a snapshot is written)."""
        while len(self.runs) > 1:
            self._merge_last()

    def _merge_last(self) -> None:
        # The two runs' directories go first: they hold their h1 arrays, which would
        # otherwise stay alive beside the merged copy.
        for r in (len(self.runs) - 2, len(self.runs) - 1):
            self._directories.pop(r, None)
        newer = self.runs.pop()
        self.runs[-1] = merge_runs(self.runs[-1], newer)

    # --- loading from segments ------------------------------------------------------

    def load(self, duck: duckdb.DuckDBPyConnection, segments: Sequence[Read], seq: int) -> None:
        """(Re)build from base segments: the latest live row per key among them."""
        self.runs = []
        self._directories.clear()
        self.codes = {"tenant": Codes()}
        self.apply_segments(duck, segments)
        self.seq = seq

    def apply_segments(self, duck: duckdb.DuckDBPyConnection, segments: Sequence[Read]) -> int:
        """Fold rows of newer ``segments`` in. Their rows won when they were written
        (a commit catches up first), so where a stored key ties on version and id
        prefix the segment's row is the later word."""
        if not segments:
            return 0
        spec = self.spec
        ds = spec.datasource
        names = [ds.key, ds.version, ds.event_id, ds.tenant, *(c.name for c in self.state)]
        names = list(dict.fromkeys(names))
        relation = merged_base(spec, [], list(segments))
        query = exp.select(*(col(n) for n in names)).from_(subquery(relation, "m"))
        reader = duck.sql(query.sql(dialect=DIALECT)).to_arrow_reader(1 << 20)
        rows = 0
        for batch in reader:
            table = pa.Table.from_batches([batch])
            rows += table.num_rows
            self.fold(table)
        return rows

    def fold(self, table: pa.Table) -> None:
        new = self.encode(table)
        slots = self.find(new["h1"], new["h2"])
        stored = self.gather(slots, ["version", "eprefix"])
        if stored:
            v, sv = new["version"], stored["version"]
            keep = ~slots.found | (v > sv) | ((v == sv) & (new["eprefix"] >= stored["eprefix"]))
        else:
            keep = np.ones(len(slots.run), np.bool_)
        self.update(slots.take(keep), {n: a[keep] for n, a in new.items()})


def _directory(hs: Array) -> tuple[Array, int]:
    """Where each slot of leading bits starts in sorted ``hs`` (one slot per
    ``_PER_SLOT`` keys, so half a byte a key), and the shift that gives a slot.
    Counted a chunk at a time: a whole-run temporary would be 8 bytes a key."""
    bits = max(1, int(np.log2(max(len(hs) // _PER_SLOT, 2))))
    shift = np.uint64(64 - bits)
    counts = np.zeros(1 << bits, np.int64)
    for i in range(0, len(hs), _CHUNK):
        counts += np.bincount((hs[i : i + _CHUNK] >> shift).astype(np.intp), minlength=1 << bits)
    starts = np.zeros(len(counts) + 1, np.uint32 if len(hs) < 1 << 32 else np.uint64)
    np.cumsum(counts, out=starts[1:])
    return starts, int(shift)


def merge_runs(older: Columns, newer: Columns) -> Columns:
    """One run sorted by ``h1`` from two, a column at a time (both are emptied as
    their columns move). Where the newer rows land is worked out once for every
    column; the peak beyond the two runs is one merged column and a byte a row."""
    at = np.searchsorted(older["h1"], newer["h1"])
    total = len(older["h1"]) + len(newer["h1"])
    landing = at + np.arange(len(at))  # newer rows go before equal older ones
    del at
    is_new = np.zeros(total, np.bool_)
    is_new[landing] = True
    is_old = ~is_new
    del is_new
    merged: Columns = {}
    for name in list(older):
        old, new = older.pop(name), newer.pop(name)
        out = np.empty(total, np.result_type(old.dtype, new.dtype))
        out[landing] = new
        out[is_old] = old
        del old, new
        merged[name] = out
    return merged
