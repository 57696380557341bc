"""Waiting for a ``tally serve`` child to answer, for whoever starts one (the demo,
benchmarks, tests): poll ``/readyz``, and if the child died, say why in one line."""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request

from tally.errors import StoreUnavailable


def wait_ready(
    url: str,
    server: subprocess.Popen[bytes] | None = None,
    *,
    timeout_s: float = 60.0,
    stop: threading.Event | None = None,
) -> None:
    """Return once ``url``/readyz answers 200 (or ``stop`` is set)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        if server is not None and server.poll() is not None:
            err = server.stderr.read().decode(errors="replace") if server.stderr else ""
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {server.returncode}"
            raise StoreUnavailable(f"the query API did not start: {last}")
        if _answers(f"{url}/readyz"):
            return
        if time.monotonic() >= deadline:
            raise StoreUnavailable(f"the query API at {url} was not ready within {timeout_s:g} s")
        stop.wait(0.1)


def _answers(url: str) -> bool:
    """Whether ``url`` answers 200. The standard library's client, because whoever
    waits may be a plain install, without the dev tools (httpx is one)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
