"""Run every benchmark under ``bench/`` and gather their figures.

Each ``bench/<name>.py`` that defines ``main(argv)`` is run in its own process (so
peak-memory figures stay per benchmark) with ``--scale``; its
``bench/results/<name>.json`` is read back and every figure goes into
``bench/results/latest.json`` together with the scale, the machine and, per
benchmark, whether it passed and how long it took.

    .venv/bin/python bench/run_all.py --scale small|full [--only store ...]
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH_DIR, RESULTS_DIR, format_table, machine, parser

# relay.py needs a running broker (--bootstrap) and takes no --scale; its figure is
# druid.py's ingest_olap_events_per_s_druid, measured on engines that run starts.
NOT_BENCHMARKS = {"__init__", "common", "run_all", "relay"}


def discover() -> list[str]:
    """Modules in bench/ that define a top-level ``main`` function."""
    names = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            names.append(path.stem)
    return names


def run_one(name: str, scale: str) -> dict[str, Any]:
    result_path = RESULTS_DIR / f"{name}.json"
    result_path.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / f"{name}.py"), "--scale", scale],
        cwd=BENCH_DIR.parent,
        check=False,
    )
    seconds = time.perf_counter() - start
    outcome: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "seconds": round(seconds, 1),
        "figures": [],
    }
    if proc.returncode == 0 and result_path.exists():
        outcome["figures"] = json.loads(result_path.read_text(encoding="utf-8"))["figures"]
    elif proc.returncode == 0:
        outcome["ok"] = False
        outcome["error"] = f"{result_path.name} was not written"
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = parser("Run every benchmark and write bench/results/latest.json")
    p.add_argument("--only", nargs="*", metavar="NAME", help="run only these benchmarks")
    args = p.parse_args(argv)
    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(unknown)} (known: {names})")
        names = [n for n in names if n in args.only]
    benchmarks: dict[str, Any] = {}
    figures: list[dict[str, Any]] = []
    seen: set[str] = set()
    for name in names:
        print(f"== bench/{name}.py --scale {args.scale}", file=sys.stderr, flush=True)
        outcome = run_one(name, args.scale)
        for figure in outcome.pop("figures"):
            qualified = figure["name"] if figure["name"] not in seen else f"{name}.{figure['name']}"
            seen.add(qualified)
            figures.append({**figure, "name": qualified, "benchmark": name})
        benchmarks[name] = outcome
    doc = {"figures": figures, "scale": args.scale, "machine": machine(), "benchmarks": benchmarks}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "latest.json"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(figures, f"all benchmarks --scale {args.scale}"))
    failed = [n for n, o in benchmarks.items() if not o["ok"]]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
