"""``tally engines`` with a real OpenSearch: the JSON line and its ``env``, loopback
only, a document round trip through Tally's analyzer (the classpath modules loaded),
and a kill that keeps the port and the data."""

from __future__ import annotations

import os
import re
import signal
import uuid
from pathlib import Path

import httpx

from tests.cli import tally
from tests.opensearch import OpenSearch

URL = re.compile(r"^http://127\.0\.0\.1:\d{2,5}$")


def _data_dir(opensearch: OpenSearch) -> Path:
    return opensearch.engine.dir.parent.parent


def test_up_prints_one_json_line_with_env_and_the_node_answers(opensearch: OpenSearch) -> None:
    ran = tally("engines", "up", "opensearch", "--format", "json", data_dir=_data_dir(opensearch))
    assert ran.code == 0, ran.err
    assert len(ran.out.splitlines()) == 1
    doc = ran.json()
    info = doc["engines"]["opensearch"]
    running = opensearch.engine.running()
    assert running is not None and info["pid"] == running.pid  # already up: not a second node
    assert info["running"] is True and info["version"].startswith("2.19.")
    assert URL.match(info["url"]), info
    assert doc["env"] == {"TALLY_SEARCH__BACKEND": "opensearch", "TALLY_SEARCH__URL": info["url"]}
    root = httpx.get(info["url"], timeout=10).json()
    assert root["version"]["distribution"] == "opensearch"
    assert root["version"]["number"] == info["version"]
    nodes = httpx.get(f"{info['url']}/_nodes/http,transport", timeout=10).json()["nodes"]
    (node,) = nodes.values()
    for layer in ("http", "transport"):
        assert all(a.startswith("127.0.0.1:") for a in node[layer]["bound_address"]), node[layer]
    # The classpath modules are loaded: the ngram tokenizer (analysis-common) works.
    name = f"probe-{uuid.uuid4().hex[:8]}"
    tokenizer = {"type": "ngram", "min_gram": 2, "max_gram": 3, "token_chars": []}
    body = {"settings": {"analysis": {"tokenizer": {"g": tokenizer}}}}
    assert httpx.put(f"{info['url']}/{name}", json=body, timeout=30).status_code == 200
    got = httpx.post(
        f"{info['url']}/{name}/_analyze", json={"tokenizer": "g", "text": "김민지"}, timeout=10
    ).json()
    assert [t["token"] for t in got["tokens"]] == ["김민", "김민지", "민지"]
    # A write to an index Tally did not create is refused, not auto-created.
    refused = httpx.post(f"{info['url']}/ghost-{name}/_doc", json={"a": 1}, timeout=10)
    assert refused.status_code == 404, refused.text
    httpx.delete(f"{info['url']}/{name}", timeout=30)


def test_a_killed_node_comes_back_on_the_same_port_with_its_data(opensearch: OpenSearch) -> None:
    url = opensearch.url
    name = f"survives-{uuid.uuid4().hex[:8]}"
    settings = {"index": {"number_of_replicas": 0}}
    assert httpx.put(f"{url}/{name}", json={"settings": settings}, timeout=30).status_code == 200
    for i in range(20):
        put = httpx.put(f"{url}/{name}/_doc/{i}", json={"n": i}, timeout=10)
        assert put.status_code == 201, put.text  # acknowledged: fsynced to the translog
    before = opensearch.engine.running()
    assert before is not None
    os.kill(before.pid, signal.SIGKILL)
    assert before.wait_exit(30)
    data_dir = _data_dir(opensearch)
    down = tally("engines", "status", "--format", "json", data_dir=data_dir).json()
    assert down["engines"]["opensearch"]["running"] is False
    ran = tally("engines", "up", "opensearch", "--format", "json", data_dir=data_dir)
    assert ran.code == 0, ran.err
    info = ran.json()["engines"]["opensearch"]
    assert info["url"] == url and info["pid"] != before.pid
    httpx.get(f"{url}/_cluster/health/{name}", params={"wait_for_status": "green"}, timeout=60)
    httpx.post(f"{url}/{name}/_refresh", timeout=30)
    count = httpx.get(f"{url}/{name}/_count", timeout=10).json()["count"]
    assert count == 20
    httpx.delete(f"{url}/{name}", timeout=30)
