"""OpenSearch-specific behaviour on a real node (``tally engines up opensearch``): what
the contract suite (which runs here too) does not say. External-version conflicts
between two writers, deletes and the tombstones they leave, routing by tenant,
newest-first paging past ``index.max_result_window``, and a node killed mid-ingest."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition

from ingest.kafka import consumer_config, ensure_topics
from producers.generate import GeneratorConfig
from producers.publish import Publisher
from search import open_index
from search.protocol import UpsertResult
from tally.settings import SearchSettings, Settings
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.conftest import broker_settings
from tests.factories import latest_by_key
from tests.ingest.conftest import start_ingest
from tests.ingest.reference import build
from tests.ingest.verify import assert_index
from tests.opensearch import OpenSearch
from tests.search.conftest import OPENSEARCH_SHARDS, MakeOpenSearch, new_prefix
from tests.search.test_contract import T0, doc, put


def test_a_second_writer_never_lowers_what_the_first_wrote(make_opensearch: MakeOpenSearch) -> None:
    """Two processes' indices on one prefix: the engine's external versions decide, with
    no read before write. An older or equal version from the other writer is stale."""
    first = make_opensearch()
    second = make_opensearch(prefix=first.cfg.index_prefix)
    assert put(first, [doc("k1", 5, order_name="five"), doc("k2", 2)]) == UpsertResult(2, 0)
    assert put(second, [doc("k1", 4, order_name="four"), doc("k2", 2, event_id="other")]) == (
        UpsertResult(0, 2)
    )
    assert put(second, [doc("k2", 3)]) == UpsertResult(1, 0)
    assert first.versions(["k1", "k2"]) == {"k1": 5, "k2": 3}
    assert {h.key for h in first.search("m1", "five")} == {"k1"}
    assert first.search("m1", "four") == []


def test_a_delete_leaves_a_tombstone_that_refuses_older_versions(
    make_opensearch: MakeOpenSearch,
) -> None:
    """A deleted key's version is remembered (``index.gc_deletes``, 60 s): an older
    version arriving late is still refused as stale, a newer one is taken, and
    ``replace`` says why it could not put back an older doc."""
    index = make_opensearch()
    put(index, [doc("k1", 5), doc("k2", 1)])
    assert index.delete(["k1", "missing"]) == 1
    assert index.versions(["k1", "k2"]) == {"k2": 1}
    # A plain delete stores its tombstone at the deleted version + 1 (here 6).
    assert put(index, [doc("k1", 3)]) == UpsertResult(0, 1)
    assert put(index, [doc("k1", 6)]) == UpsertResult(0, 1)
    assert index.versions(["k1"]) == {}
    put(index, [doc("k2", 7)])
    result = index.replace(0, [doc("k2", 4)])  # lower a stored version: delete, re-index
    assert result.replaced == 0 and "gc_deletes" in result.refused["k2"]
    assert index.versions(["k2"]) == {}
    assert put(index, [doc("k1", 7)]) == UpsertResult(1, 0)
    assert index.versions(["k1"]) == {"k1": 7}


def test_the_index_template_is_generated_from_the_spec(
    make_opensearch: MakeOpenSearch, opensearch: OpenSearch
) -> None:
    """The spec's settings and mappings are stored as an index template: an index an
    operator deletes and creates again by hand (a restore) gets Tally's analyzer and
    strict mappings back, and grams still find its documents."""
    index = make_opensearch(refresh_interval_s=30)
    put(index, [doc("k1", order_name="아메리카노 grande")])
    url = f"{opensearch.url}/{index.index}"
    template = httpx.get(f"{opensearch.url}/_index_template/{index.index}", timeout=10).json()
    (body,) = template["index_templates"]
    assert body["index_template"]["_meta"]["tally_datasource"] == "payments"
    settings = httpx.get(f"{url}/_settings", timeout=10).json()[index.index]["settings"]
    assert settings["index"]["refresh_interval"] == "30s"
    assert settings["index"]["number_of_shards"] == str(OPENSEARCH_SHARDS)
    assert httpx.delete(url, timeout=30).status_code == 200
    assert httpx.put(url, timeout=30).status_code == 200  # by hand, no body
    mappings = httpx.get(f"{url}/_mapping", timeout=10).json()[index.index]["mappings"]
    assert mappings["dynamic"] == "strict"
    assert mappings["properties"]["order_name"]["analyzer"] == "tally_ngram"
    again = make_opensearch(prefix=index.cfg.index_prefix)
    put(again, [doc("k2", order_name="아메리카노 tall")])
    assert {h.key for h in again.search("m1", "메리카")} == {"k2"}


def test_a_tenants_documents_live_on_one_shard(
    make_opensearch: MakeOpenSearch, opensearch: OpenSearch
) -> None:
    index = make_opensearch()
    tenants = [f"m{i}" for i in range(8)]
    put(index, [doc(f"{t}-{i}", tenant=t) for t in tenants for i in range(20)])
    shards_of: dict[str, set[int]] = {t: set() for t in tenants}
    for shard in range(OPENSEARCH_SHARDS):
        got = httpx.post(
            f"{opensearch.url}/{index.index}/_search",
            params={"preference": f"_shards:{shard}"},
            json={"size": 1000, "_source": ["tenant"]},
            timeout=30,
        ).json()
        for hit in got["hits"]["hits"]:
            shards_of[hit["_source"]["tenant"]].add(shard)
    assert all(len(s) == 1 for s in shards_of.values()), shards_of
    assert len(set().union(*shards_of.values())) > 1, "every tenant on one shard proves nothing"
    for t in tenants:  # and a search finds them all on that shard alone
        assert len(index.search(t, "", limit=1000)) == 20


@pytest.mark.parametrize("order", ["time", "score"])
def test_search_pages_past_the_result_window(
    make_opensearch: MakeOpenSearch, opensearch: OpenSearch, order: str
) -> None:
    """``index.max_result_window`` = 40, 130 matches: one request cannot hold them (the
    engine refuses it), so the search pages with ``search_after`` and finds each once,
    in order. (osmem ignores search_after by score: see test_elastic.py's xfail.)"""
    index = make_opensearch(max_result_window=40)
    docs = [
        doc(f"k{i:03}", time=T0 + timedelta(minutes=i % 17), order_name="Latte" + " x" * (i % 5))
        for i in range(130)
    ]
    put(index, [*docs, doc("other", tenant="m2", order_name="Latte")])
    refused = httpx.post(f"{opensearch.url}/{index.index}/_search", json={"size": 41}, timeout=30)
    assert refused.status_code == 400 and "max_result_window" in refused.text
    hits = index.search("m1", "latte", limit=1000, order=order)  # type: ignore[arg-type]
    assert len(hits) == len({h.key for h in hits}) == 130
    if order == "time":
        assert [(h.time, h.key) for h in hits] == sorted(
            ((d.time, d.key) for d in docs), reverse=True
        )
    else:
        assert hits == sorted(hits, key=lambda h: (-h.score, h.key))
    assert index.search("m1", "latte", limit=75, order=order) == hits[:75]  # type: ignore[arg-type]


def _search_committed(settings: Settings, ends: dict[int, int]) -> bool:
    probe = Consumer(consumer_config(settings, settings.group("search", "payments")))
    try:
        topic = settings.topic("payments.v1")
        committed = probe.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        probe.close()
    return all((tp.offset or 0) >= ends[tp.partition or 0] for tp in committed)


def _until(condition: object, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_node_killed_mid_ingest_loses_nothing(
    opensearch: OpenSearch, kafka_broker: KafkaBroker, registry: SpecRegistry, tmp_path: Path
) -> None:
    """``tally ingest --sink search`` on real Kafka into OpenSearch; the node is
    SIGKILLed while the sink writes, stays down while more events are published, and
    is started again on its data. The sink retries meanwhile (no commit of what was not
    written) and ends with every key at its latest version, nothing missing or extra."""
    prefix = new_prefix()
    search = SearchSettings(
        backend="opensearch", url=opensearch.url, index_prefix=prefix, shards=2, replicas=0
    )
    settings = broker_settings(kafka_broker, tmp_path).model_copy(update={"search": search})
    ensure_topics(settings, registry)
    published = build(
        GeneratorConfig(transactions=6_000, merchants=12, days=20, seed=11, cancel_rate=0.2),
        malformed_rate=0.0,
    )
    publisher = Publisher(settings, settings.topic("payments.v1"))
    half = len(published.wires) // 2
    publisher.send(published.wires[:half])
    log = tmp_path / "ingest.log"
    proc = start_ingest(settings, "--sink", "search", log=log)
    index = open_index(settings, registry.get("payments"))
    try:

        def indexed() -> int:
            got = httpx.get(f"{opensearch.url}/{prefix}payments/_count", timeout=10)
            return int(got.json().get("count", 0)) if got.status_code == 200 else 0

        _until(lambda: indexed() > 500, "the sink to index a first part")
        node = opensearch.engine.running()
        assert node is not None
        os.kill(node.pid, signal.SIGKILL)
        _until(lambda: opensearch.engine.running() is None, "the node to die", 30)
        publisher.send(published.wires[half:])
        assert proc.poll() is None, log.read_text()[-2000:]  # retrying, not exited
        opensearch.engine.up()
        _until(lambda: _search_committed(settings, publisher.ends), "the sink to catch up")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 0, log.read_text()[-3000:]
        assert "unreachable" in log.read_text() or "503" in log.read_text()
        spec = registry.get("payments")
        assert_index(settings, spec, latest_by_key(spec, published.good))
    finally:
        index.close()
        opensearch.delete(f"{prefix}*")
