"""`tally ingest --sink olap` on StarRocks, SIGKILLed between two loads of a batch:
the next process finishes that batch from the topic and goes on, exactly once.

The stand-in kills the ingester as its load arrives (before applying it), so each
point between the delta, base and offsets loads is hit for certain, not by chance.
Not proven here: StarRocks' own behaviour under a client that dies mid-request
(a real FE may have applied a load whose answer never arrived; the labels cover
that case as they cover this one), nor its SQL semantics (DuckDB runs the reads).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.kafka import ensure_topics
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from storage.starrocks import ddl
from tally.settings import Settings
from tally.specs import SpecRegistry
from tests.brokers import Broker
from tests.conftest import broker_settings
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import build
from tests.ingest.verify import assert_exact
from tests.storage.starrocks.standin import StandIn
from tests.storage.starrocks.target import Target

pytestmark = pytest.mark.slow

# (table whose load kills, which of its loads): the 3rd batch's
POINTS = {
    "before-its-deltas": ("payments_hourly", 3),
    "after-deltas-before-base": ("payments", 3),
    "after-base-before-offsets": (ddl.WRITES, 3),
    "at-its-offsets": (ddl.OFFSETS, 6),  # each batch loads the offsets twice (intent, end)
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_sigkill_between_two_loads_doubles_and_loses_nothing(
    point: str,
    dev_broker: Broker,
    starrocks: Target,
    standin: StandIn,
    data_dir: Path,
    registry: SpecRegistry,
    tmp_path: Path,
) -> None:
    base = broker_settings(dev_broker, data_dir, partitions=2)
    base = base.model_copy(
        update={"ingest": base.ingest.model_copy(update={"batch_max_rows": 400})}
    )
    settings: Settings = starrocks.settings(data_dir, registry, base)
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=3_000, merchants=10, days=40, seed=17, cancel_rate=0.2),
        malformed_rate=0.01,
    )
    Publisher(settings, settings.topic("payments.v1")).send(published.wires)
    log = tmp_path / "ingest.log"
    first = start_ingest(settings, "--sink", "olap", log=log)
    table, nth = POINTS[point]
    standin.kill_on(table, nth, first.pid)
    first.wait(120)
    assert (table, first.pid) in standin.killed, log.read_text()[-2000:]
    final = start_ingest(settings, "--sink", "olap", "--until-idle", "3", log=log)
    final.communicate(timeout=300)
    assert final.returncode == 0, log.read_text()[-3000:]
    assert "finishing a batch interrupted mid-load" in log.read_text()
    assert_exact(settings, registry, published, search=False)
