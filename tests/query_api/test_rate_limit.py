"""``api.rate_limit`` against a real ``tally serve`` (two workers) with a low limit: it
counts per key across the worker processes, answers 429 with ``Retry-After`` and the
JSON error body, and leaves other keys and the health routes alone."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from query_api.ready import wait_ready
from tally.errors import ConfigError
from tally.settings import load_settings
from tests.ingest.conftest import free_port
from tests.query_api.conftest import Api

SALES = {"from": "2026-10-01T00:00:00+09:00", "to": "2026-10-02T00:00:00+09:00"}


@pytest.fixture
def limited(api: Api) -> Iterator[str]:
    """A second server over the same store, allowing 5 requests per key and minute."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tally", "serve", "--port", str(port), "--workers", "2"],
        env={
            **os.environ,
            "TALLY_DATA_DIR": str(api.settings.data_dir),
            "TALLY_API__RATE_LIMIT": "5/minute",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def _auth(api: Api, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.keys[who]}"}


def test_a_key_past_its_limit_gets_429_while_others_are_served(api: Api, limited: str) -> None:
    m1 = _auth(api, "m1")
    # A new connection per request, so both workers answer: they count together.
    served = [
        httpx.get(f"{limited}/v1/transactions", params={"limit": 1}, headers=m1).status_code
        for _ in range(5)
    ]
    assert served == [200] * 5
    for over in (
        httpx.get(f"{limited}/v1/transactions", params={"limit": 1}, headers=m1),
        httpx.get(f"{limited}/v1/sales", params=SALES, headers=m1),
        httpx.post(f"{limited}/v1/sql", json={"sql": "SELECT 1"}, headers=m1),
    ):
        assert over.status_code == 429, over.text
        error = over.json()["error"]
        assert error["code"] == "rate_limited" and "5 per 1 minute" in error["message"]
        assert 1 <= int(over.headers["Retry-After"]) <= 60
    other = httpx.get(f"{limited}/v1/sales", params=SALES, headers=_auth(api, "m2"))
    assert other.status_code == 200, other.text
    for _ in range(3):
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(f"{limited}{path}", headers=m1).status_code == 200


def test_an_unreadable_rate_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_API__RATE_LIMIT", "lots")
    with pytest.raises(ConfigError, match=r"api\.rate_limit: .*not a rate"):
        load_settings(None)
    monkeypatch.setenv("TALLY_API__RATE_LIMIT", "OFF")
    assert load_settings(None).api.rate_limit == "off"
    monkeypatch.setenv("TALLY_API__RATE_LIMIT", "10/second;300/minute")
    assert load_settings(None).api.rate_limit == "10/second;300/minute"
