"""A real uvicorn server (``tally serve``, two worker processes) over a store and a
tantivy index holding two merchants' payments; keys for each merchant and an admin.

The data here is committed through the store and index APIs directly; the end-to-end
test through the broker and ``tally ingest`` lives in test_e2e.py.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.kafka import ensure_topics
from producers.generate import GeneratorConfig, generate_events
from producers.malformed import Wire, with_malformed
from producers.publish import Publisher
from producers.settlements import generate_settlements
from query_api.keys import KeyStore
from query_api.ready import wait_ready
from search import Doc, open_index
from storage import open_store
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry, spec_paths
from tally.timeutil import parse_time
from tests.brokers import Broker
from tests.conftest import broker_settings
from tests.factories import METHODS, latest_by_key, payment
from tests.ingest.conftest import env_for, free_port

MERCHANTS = ("m1", "m2")
NAMES = ("김민지", "이서준", "Kim Minji", "Olivia Park", "박지훈", "Liam Choi")
PRODUCTS = (
    "원두 커피 1kg",
    "Coffee beans",
    "무선 이어폰",
    "Wireless earbuds",
    "운동화",
    "Sneakers",
)
START = datetime(2026, 9, 30, 15, tzinfo=UTC)  # 2026-10-01 00:00 in Seoul


@dataclass(repr=False)
class Api:
    url: str
    keys: dict[str, str]  # merchant (or "admin") → bearer key
    events: list[dict[str, Any]]  # everything committed
    spec: DatasourceSpec
    settings: Settings
    settlements: list[dict[str, Any]] = field(default_factory=list)  # committed too

    def client(self, who: str | None) -> httpx.Client:
        """A client whose every error response is checked for hygiene (``hygienic``)."""
        headers = {} if who is None else {"Authorization": f"Bearer {self.keys[who]}"}
        hook = functools.partial(hygienic, who=who)
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=30, event_hooks={"response": [hook]}
        )

    def __repr__(self) -> str:
        return f"Api({self.url})"

    def latest(self) -> dict[str, Any]:
        return dict(latest_by_key(self.spec, self.events))


_PATH = re.compile(r"(?<![\w:/])/(?:[\w.@+-]+/)+[\w.@+-]*")


def hygienic(response: httpx.Response, who: str | None) -> None:
    """Every error any API suite produces: the JSON error body with a request id (the
    header's too), no filesystem path, no stack trace, no other merchant's id that
    the request did not name itself."""
    if response.status_code < 400:
        return
    response.read()
    assert not _PATH.search(response.text), f"a path in an error: {response.text}"
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text
    if response.request.url.path == "/readyz":  # a not-ready probe answers its checks
        return
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and {"code", "message"} <= set(error), body
    message = str(error["message"])
    assert error.get("request_id") == response.headers.get("X-Request-ID") != "", body
    asked = str(response.request.url) + response.request.content.decode(errors="replace")
    for other in MERCHANTS:
        if other != who and other not in asked:
            assert not re.search(rf"\b{other}\b", message), f"{other} leaked to {who}: {message}"


def _history(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = []
    for i in range(n):
        at = START + timedelta(minutes=rng.randrange(60 * 24 * 45))
        amount = rng.randrange(1, 200) * 100
        common: dict[str, Any] = {
            "approved_at": at,
            "amount": amount,
            "merchant_id": rng.choice(MERCHANTS),
            "method": rng.choice(METHODS),
            "currency": rng.choice(("KRW", "KRW", "USD")),
            "order_name": rng.choice(PRODUCTS),
            "customer_name": rng.choice(NAMES),
        }
        events.append(payment(f"tx{i:04d}", **common))
        if rng.random() < 0.3:
            events.append(payment(f"tx{i:04d}", 2, canceled_amount=amount, **common))
    return events


def index_docs(settings: Settings, spec: DatasourceSpec, rows: list[dict[str, Any]]) -> None:
    ds = spec.datasource
    index = open_index(settings, spec)  # the backend ``settings`` name
    try:
        docs = [
            Doc(
                key=r[ds.key],
                tenant=r[ds.tenant],
                time=r[ds.time],
                version=r[ds.version],
                event_id=r[ds.event_id],
                text={f: r[f] for f in ds.searchable},
            )
            for r in rows
        ]
        index.upsert(0, docs)
        index.commit(0, max(d.time for d in docs))
    finally:
        index.close()


# The API suites serve payments and their settlements (the ledger, joins, details).
SPECS = ("payments", "settlements")


@pytest.fixture(scope="session")
def api_registry() -> SpecRegistry:
    return SpecRegistry.load(spec_paths([Path(n) for n in SPECS]))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, api_registry: SpecRegistry) -> Iterator[Api]:
    data_dir = tmp_path_factory.mktemp("api")
    settings = Settings(data_dir=data_dir, specs=tuple(Path(n) for n in SPECS))
    spec = api_registry.get("payments")
    events = fill(settings, api_registry)
    settlements = fill_settlements(settings, api_registry, events)
    env = {
        "TALLY_DATA_DIR": str(data_dir),
        "TALLY_SPECS": json.dumps(SPECS),
        "TALLY_API__SQL_TIMEOUT_S": "1",
        # The limiter runs but never trips: hypothesis and schemathesis send bursts.
        # test_rate_limit.py starts a server with a low limit.
        "TALLY_API__RATE_LIMIT": "1000000/second",
    }
    with serving(settings, spec, events, env) as running:
        running.settlements = settlements
        yield running


def fill(settings: Settings, registry: SpecRegistry) -> list[dict[str, Any]]:
    """The API suites' history (600 payments and their updates) committed to the store
    in batches and indexed in the search backend ``settings`` name; returns it."""
    events = _history(600, seed=7)
    store = open_store(settings, registry)
    for i in range(0, len(events), 150):
        store.commit("payments", events[i : i + 150])
    store.close()
    index_docs(settings, registry.get("payments"), events)
    return events


def fill_settlements(
    settings: Settings, registry: SpecRegistry, payments: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Settlements of the payments (every tenth has none yet), committed in batches in
    the order the settlement domain publishes them; returns them."""
    spec = registry.get("settlements")
    events = [
        {**e, **{n: parse_time(e[n]) for n in spec.timestamps}}
        for e in generate_settlements(payments)
        if int(e["txn_id"][2:]) % 10
    ]
    store = open_store(settings, registry)
    for i in range(0, len(events), 200):
        store.commit("settlements", events[i : i + 200])
    store.close()
    return events


@contextlib.contextmanager
def serving(
    settings: Settings, spec: DatasourceSpec, events: list[dict[str, Any]], env: dict[str, str]
) -> Iterator[Api]:
    """`tally serve` (two workers) over what ``settings`` hold, a key per merchant and
    an admin key issued, with ``env`` on top of the process's environment."""
    keys = KeyStore(settings.keys_path)
    issued = {m: keys.create(m)[1] for m in MERCHANTS}
    issued["admin"] = keys.create(None, admin=True)[1]
    keys.close()
    port = free_port()
    # To a file, not a pipe nobody reads (a full one blocks the server), kept to read
    # after a failure (a CI run saw this server stop answering mid-suite).
    log = (settings.data_dir / "serve.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "2"],
        env={**os.environ, **env},
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        yield Api(url, issued, events, spec, settings)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


# --- a live platform for the pages: the broker, `tally ingest`, `tally serve` ----------


@dataclass(repr=False)
class Live:
    """A store and index filled through the development broker by ``tally ingest``
    (malformed messages included, so there are dead letters), served by ``tally
    serve``; keys for three merchants, and an admin key."""

    url: str
    settings: Settings
    keys: dict[str, str]  # merchant id (or "admin") → key
    events: list[dict[str, Any]]  # what was published, valid events only
    malformed: int  # malformed messages generated
    published: int = 0  # messages on the topic
    dead_letters: int = 0  # letters on the dead-letter topic (a replayed one comes back)

    def publish(self, wires: list[Wire]) -> None:
        Publisher(self.settings, self.settings.topic("payments.v1")).send(wires)
        self.published += len(wires)

    def client(self, who: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.keys[who]}"}, timeout=30
        )

    def __repr__(self) -> str:
        return f"Live({self.url})"

    def merchants(self) -> list[str]:
        return sorted(k for k in self.keys if k != "admin")

    def ingest(self, sink: str = "all") -> None:
        done = subprocess.run(
            [sys.executable, "-m", "tally", "ingest", "--sink", sink, "--until-idle", "2"],
            env=env_for(self.settings),
            capture_output=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.fixture(scope="session")
def live(
    tmp_path_factory: pytest.TempPathFactory,
    registry: SpecRegistry,
    dev_broker: Broker,
) -> Iterator[Live]:
    data_dir = tmp_path_factory.mktemp("live")
    settings = broker_settings(dev_broker, data_dir)
    ensure_topics(settings, registry)
    now = datetime.now(UTC)
    config = GeneratorConfig(
        transactions=3000, merchants=3, days=40, start=now - timedelta(days=40), seed=14
    )
    events = list(generate_events(config))
    wires = list(with_malformed(iter(events), 0.01, 14))
    keys = KeyStore(settings.keys_path)
    issued = {m: keys.create(m)[1] for m in sorted({e["merchant_id"] for e in events})}
    issued["admin"] = keys.create(None, admin=True)[1]
    keys.close()
    platform = Live("", settings, issued, events, len(wires) - len(events))
    platform.publish(wires)
    platform.ingest()
    platform.dead_letters = platform.malformed
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "1"],
        env=env_for(settings)
        | {"TALLY_API__RATE_LIMIT": "1000000/second", "TALLY_API__PAGE_REFRESH_S": "1"},
        stdout=subprocess.DEVNULL,
        stderr=(data_dir / "serve.log").open("ab"),  # a pipe nobody reads would fill
    )
    platform.url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(platform.url, server)
        yield platform
    finally:
        server.terminate()
        server.wait(30)
