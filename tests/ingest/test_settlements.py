"""The shipped ``settlements`` datasource end to end beside payments, with no code of
its own: the payments' settlements (revised hours to days later: holds that move the
payout day, reversals, payouts again), malformed messages and a redelivered stretch,
through the development broker into both sinks; every key's latest version in OLAP,
the daily rollup equal to a recount, the search index, each malformed message
dead-lettered once, the late revisions compacted, and ``tally verify`` clean."""

from __future__ import annotations

import ast
import json
import re
import threading
from pathlib import Path

from ingest.kafka import ensure_topics
from ingest.service import run_ingest
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage import open_store
from tally.specs import SpecRegistry, spec_paths
from tests.brokers import Broker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.ingest.conftest import env_for
from tests.ingest.reference import build, published
from tests.ingest.verify import assert_exact

ROOT = Path(__file__).resolve().parents[2]
NAMED = (Path("payments"), Path("settlements"))  # shipped specs, turned on by name


def test_settlements_flow_through_both_sinks_exactly_once(
    dev_broker: Broker, tmp_path: Path
) -> None:
    registry = SpecRegistry.load(spec_paths(NAMED))
    settings = broker_settings(dev_broker, tmp_path, partitions=3)
    settings = settings.model_copy(update={"specs": NAMED})
    env = env_for(settings)  # TALLY_SPECS names both
    ensure_topics(settings, registry)
    config = GeneratorConfig(transactions=1500, merchants=8, days=6, seed=12, cancel_rate=0.3)
    payments = build(config, 0.01)
    sspec = registry.get("settlements")
    settlements = build(config, 0.01, sspec)
    statuses = {e["status"] for e in settlements.good}
    assert statuses == {"SCHEDULED", "HELD", "PAID_OUT", "REVERSED"}, statuses
    # A producer retry redelivers a stretch of settlements: the same events (and
    # malformed messages) at new offsets.
    settlements = published(settlements.wires + settlements.wires[400:900], sspec)
    for spec, sent in ((registry.get("payments"), payments), (sspec, settlements)):
        Publisher(settings, settings.topic(spec.datasource.topic)).send(sent.wires)
    reports = run_ingest(settings, list(registry), ["olap", "search"], threading.Event(), 1.0)
    assert not [r.error for r in reports if r.error]
    assert_exact(settings, registry, payments)
    assert_exact(settings, registry, settlements, datasource="settlements")

    store = open_store(settings, registry)
    try:
        late = sum(p.late_rows for p in store.partition_stats("settlements"))
    finally:
        store.close()
    assert late > 0, "revisions of old payouts landed in old partitions"
    ran = tally("compaction", "run", "--format", "json", env=env)
    assert ran.code == 0, ran.err[-2000:]
    assert_exact(settings, registry, settlements, datasource="settlements", search=False)
    every = tally("verify", "--format", "json", env=env)
    assert every.code == 0, every.err[-2000:]
    lines = [json.loads(line) for line in every.out.splitlines()]
    assert {r["datasource"]: r["differences"] for r in lines} == {
        "payments": [],
        "settlements": [],
    }


def test_no_code_outside_the_specs_and_the_ledger_names_settlements() -> None:
    """A datasource is a spec, not code: only its spec, its generator, the demo that
    streams it and the ledger (payments ⋈ settlements by definition) name it in code
    (identifiers and strings; a docstring or comment may use it as an example)."""
    allowed = {
        "producers/settlements.py",
        "producers/cli.py",  # tally generate --settlements
        "tally/demo.py",
        "tally/cli.py",  # the demo's specs
        "query_api/routes/ledger.py",
    }
    pipeline = ("ingest", "storage", "search", "compaction", "rollups", "query_api", "tally")
    found = set()
    for folder in pipeline:
        for path in (ROOT / folder).rglob("*"):
            text = path.read_text(encoding="utf-8") if path.is_file() else ""
            names = _code_words(text) if path.suffix == ".py" else ""
            if path.suffix in (".js", ".html"):
                names = text
            if re.search(r"settlement", names, re.IGNORECASE):
                found.add(str(path.relative_to(ROOT)))
    assert found <= allowed, sorted(found - allowed)


def _code_words(source: str) -> str:
    """The identifiers and string literals of a module, without its docstrings."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings:
                words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
            words.append(node.name)
        elif isinstance(node, ast.arg):
            words.append(node.arg)
    return " ".join(words)
