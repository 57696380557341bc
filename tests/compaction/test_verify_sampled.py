"""``tally verify`` on a datasource whose search index keeps a 30% sample by key
(``[sinks.search] sample = 0.3``): the index holds exactly the sampled keys, whole,
and ``/metrics`` counts what was kept and skipped; verify is clean, does not call a
skipped key missing, and still finds a sampled key that is missing and a skipped one
that is indexed; the API says when a keyword was answered through the sample."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from ingest.kafka import ensure_topics
from ingest.service import run_ingest
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from search import Doc, open_index
from tally.settings import Settings
from tally.specs import SpecRegistry, builtin_spec_paths
from tally.specs.selection import in_sample
from tests.brokers import Broker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.factories import latest_by_key
from tests.ingest.conftest import env_for
from tests.ingest.reference import build
from tests.query_api.conftest import serving

SHARE = 0.3


def _sampled_spec(tmp_path: Path) -> Path:
    shipped = next(p for p in builtin_spec_paths() if p.name == "payments.toml")
    path = tmp_path / "payments.toml"
    path.write_text(shipped.read_text() + f"\n[sinks.search]\nsample = {SHARE}\n")
    return path


OUTCOMES = ("kept", "out_of_sample", "filtered")


def _selected(outcome: str) -> float:
    labels = {"sink": "search", "datasource": "payments", "outcome": outcome}
    return REGISTRY.get_sample_value("tally_ingest_selected_total", labels) or 0.0


def _verify(settings: Settings) -> tuple[int, dict[str, Any]]:
    env = env_for(settings)
    ran = tally("verify", "--format", "json", "--recheck", "0.5", env=env)
    assert "Traceback" not in ran.err and ran.code in (0, 1), ran.err[-3000:]
    return ran.code, ran.json()


def test_verify_knows_the_sample_of_the_search_index(dev_broker: Broker, tmp_path: Path) -> None:
    spec_path = _sampled_spec(tmp_path)
    registry = SpecRegistry.load([spec_path])
    spec = registry.get("payments")
    settings = broker_settings(dev_broker, tmp_path / "data", partitions=3).model_copy(
        update={"specs": (spec_path,)}
    )
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=800, merchants=6, days=5, seed=21, cancel_rate=0.3), 0.0
    )
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    before = {o: _selected(o) for o in OUTCOMES}
    reports = run_ingest(settings, [spec], ["olap", "search"], threading.Event(), until_idle=1.0)
    assert not [r.error for r in reports if r.error]

    latest = latest_by_key(spec, published.good)
    sampled = {k for k in latest if in_sample(k, SHARE)}
    # /metrics counts what the sample kept and skipped, per event (every version)
    counted = {o: _selected(o) - before[o] for o in OUTCOMES}
    events_of_sampled = sum(1 for e in published.good if e["txn_id"] in sampled)
    assert counted == {
        "kept": events_of_sampled,
        "out_of_sample": len(published.good) - events_of_sampled,
        "filtered": 0,
    }
    assert 0.2 * len(latest) < len(sampled) < 0.4 * len(latest)
    index = open_index(settings, spec)
    try:
        stored = index.all_versions()
        assert set(stored) == sampled  # whole keys, at their latest version
        assert all(stored[k] == (latest[k]["version"], latest[k]["event_id"]) for k in sampled)

        code, clean = _verify(settings)
        assert code == 0 and clean["differences"] == [], clean

        gone = sorted(sampled)[0]
        skipped = sorted(set(latest) - sampled)[0]
        assert index.delete([gone]) == 1
        row = latest[skipped]
        ds = spec.datasource
        doc = Doc(
            key=skipped,
            tenant=row[ds.tenant],
            time=row[ds.time],
            version=row[ds.version],
            event_id=row[ds.event_id],
            text={f: row[f] for f in ds.searchable},
        )
        index.upsert(0, [doc])
        index.commit(0, row[ds.time])
    finally:
        index.close()
    code, found = _verify(settings)
    assert code == 1
    seen = {(d["sink"], d["kind"], d["key"]) for d in found["differences"]}
    assert seen == {("search", "missing", gone), ("search", "unexpected", skipped)}, seen

    # The API says a keyword was answered through a sampled index; a list is not.
    env = env_for(settings)
    with serving(settings, spec, published.good, env) as api, api.client("m1") as c:
        searched = c.get("/v1/transactions", params={"q": "coffee"}).json()
        assert searched["search_coverage"] == {"sample": SHARE, "filter": None}
        listed = c.get("/v1/transactions").json()
        assert listed["search_coverage"] is None
