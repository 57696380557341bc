"""Shared benchmark plumbing (DESIGN §6): figures, percentiles, machine facts, output.

Every benchmark under ``bench/`` takes ``--scale small|full``, prints a table and
writes ``bench/results/<name>.json`` as ``{"figures": [{"name", "value", "unit"}],
"scale", "machine"}``; a figure that could not be measured on this machine has
``"value": null`` and a one-line ``"skipped"`` reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCALES = ("small", "full")


@dataclass
class Figures:
    """An ordered list of named measurements."""

    items: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str) -> float:
        if isinstance(value, float):
            value = round(value, 3) if abs(value) < 1000 else round(value, 1)
        self.items = [f for f in self.items if f["name"] != name]
        self.items.append({"name": name, "value": value, "unit": unit})
        return value

    def skip(self, name: str, unit: str, reason: str) -> None:
        """Record that ``name`` was not measured on this machine, and why (value null)."""
        self.items = [f for f in self.items if f["name"] != name]
        self.items.append({"name": name, "value": None, "unit": unit, "skipped": reason})

    def value(self, name: str) -> Any:
        """The value recorded as ``name`` (None if skipped or absent)."""
        return next((f["value"] for f in self.items if f["name"] == name), None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.items)

    def as_list(self) -> list[dict[str, Any]]:
        return list(self.items)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100), linearly interpolated between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within [0, 100]")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1024 * 1024), 1)
    except (OSError, ValueError):
        pass
    return None


def write_results(
    name: str, figures: Figures, scale: str, extra: dict[str, Any] | None = None
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc: dict[str, Any] = {"figures": figures.as_list(), "scale": scale, "machine": machine()}
    if extra:
        doc.update(extra)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(figures: Sequence[dict[str, Any]] | Figures, title: str | None = None) -> str:
    rows = [(str(f["name"]), _fmt(f["value"]), str(f["unit"])) for f in figures]
    widths = [
        max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("figure", "value", "unit"))
    ]
    line = f"{'figure':<{widths[0]}}  {'value':>{widths[1]}}  {'unit':<{widths[2]}}"
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += [f"{n:<{widths[0]}}  {v:>{widths[1]}}  {u:<{widths[2]}}" for n, v, u in rows]
    return "\n".join(out)


def format_grid(
    rows: Sequence[tuple[str, Sequence[Any], str]],
    columns: Sequence[str],
    title: str | None = None,
) -> str:
    """Measures side by side: one row per measure, a value column per ``columns``."""
    header = ["figure", *columns, "unit"]
    cells = [[name, *(_fmt(v) for v in values), unit] for name, values, unit in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        values = [f"{v:>{w}}" for v, w in zip(row[1:-1], widths[1:-1], strict=True)]
        return "  ".join([f"{row[0]:<{widths[0]}}", *values, f"{row[-1]:<{widths[-1]}}"])

    lines = [line(r).rstrip() for r in [header, *cells]]
    out = [title] if title else []
    out += [lines[0], "-" * max(map(len, lines)), *lines[1:]]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "skipped"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--scale", choices=SCALES, default="small", help="small: ~2 minutes")
    return p


class Log:
    """Progress lines on stderr, stamped with seconds since start."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f}s] {message}", file=sys.stderr, flush=True)


def build_once(data_dir: Path, name: str, size: int, build: Callable[[], object], log: Any) -> None:
    """Build a benchmark's store in ``data_dir`` unless a store of that ``size`` is there
    already (``--data-dir`` reuses one across runs)."""
    marker = data_dir / f".bench-{name}-built"
    if marker.exists() and marker.read_text() == str(size):
        log(f"reusing the store in {data_dir}")
        return
    build()
    marker.write_text(str(size))


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    box = [0.0]
    start = time.perf_counter()
    try:
        yield box
    finally:
        box[0] = time.perf_counter() - start


def repeat_ms(fn: Callable[[], object], reps: int) -> list[float]:
    """Milliseconds each of ``reps`` calls of ``fn`` took."""
    times = []
    for _ in range(reps):
        with stopwatch() as t:
            fn()
        times.append(1000 * t[0])
    return times


def max_time(table: pa.Table, column: str) -> datetime:
    """The latest instant in a timestamp column (a stream's clock)."""
    value = pc.max(table.column(column)).as_py()
    assert isinstance(value, datetime)
    return value


@contextmanager
def local_opensearch(data_dir: Path, log: Any, shards: int) -> Iterator[Any]:
    """A local OpenSearch (``engines``) as the search backend's settings (``shards``
    primaries, no replicas), or the reason it cannot run here; stopped on the way out."""
    import engines
    from tally.errors import TallyError
    from tally.settings import SearchSettings

    engine = engines.get("opensearch", data_dir)
    try:
        engine.up()
    except TallyError as exc:
        log(f"opensearch: skipped, {exc.message}")
        yield f"opensearch unavailable: {exc.message}"
        return
    try:
        url = engine.env()["TALLY_SEARCH__URL"]
        log(f"opensearch: up at {url}")
        yield SearchSettings(backend="opensearch", url=url, shards=shards, replicas=0)
    finally:
        engine.stop()
