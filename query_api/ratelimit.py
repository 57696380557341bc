"""Per-API-key request limits (``api.rate_limit``), counted in one file all workers share.

Library: ``limits`` (the strategies slowapi is built on), called from the key
dependency rather than through slowapi. slowapi keys a request before it is
authenticated (a function of the raw request, by default its IP address) and wants a
decorator and a ``request`` parameter on every route. Here the counted thing is the
verified key, which only the key dependency knows.

Storage: ``tally serve`` runs several worker processes, and the kernel hands each
connection to whichever one accepts it. Counters kept in each process's memory (limits'
``memory://``) would let a key make the limit × workers requests, or only the limit,
depending on where its connections happen to land. ``limits`` can share counters only
through a server (Redis, Memcached, MongoDB). The API runs on one host, next to the
store, so ``SqliteStorage`` keeps the counters in a small SQLite file beside the key
store instead. Each request costs one atomic upsert, in WAL mode and without fsync:
a crash may lose the counts of the current window, which does no harm.

Strategy: fixed window (``FixedWindowRateLimiter``). A key's window opens at its first
request, so the counting is exact and ``Retry-After`` can say exactly when the window
ends. The price is that a key can burst up to twice the limit across the edge between
two windows.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

from limits import parse_many
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter

from tally.errors import StoreUnavailable, TallyError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    key TEXT PRIMARY KEY,
    hits INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
"""
# One statement, so atomic across processes: an expired window restarts at this hit.
_INCR = """
INSERT INTO windows (key, hits, expires_at) VALUES (:key, :amount, :now + :expiry)
ON CONFLICT (key) DO UPDATE SET
    hits = CASE WHEN expires_at <= :now THEN :amount ELSE hits + :amount END,
    expires_at = CASE WHEN expires_at <= :now THEN :now + :expiry ELSE expires_at END
RETURNING hits
"""


class RateLimited(TallyError):
    """The key has used up a limit; ``retry_after_s`` (≥ 1) is when its window ends."""

    code = "rate_limited"
    transient = True

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SqliteStorage(Storage):
    """Fixed-window counters in a SQLite file (``sqlite:///path``), shared by processes."""

    STORAGE_SCHEME = ["sqlite"]

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: float | str | bool):
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=OFF")
        self._con.execute("PRAGMA busy_timeout=10000")
        self._con.executescript(_SCHEMA)

    @property
    def base_exceptions(self) -> type[Exception]:
        return sqlite3.Error

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        args = {"key": key, "amount": amount, "now": time.time(), "expiry": expiry}
        with self._lock:
            row = self._con.execute(_INCR, args).fetchone()
        return int(row[0])

    def get(self, key: str) -> int:
        row = self._live(key)
        return 0 if row is None else int(row[0])

    def get_expiry(self, key: str) -> float:
        row = self._live(key)
        return time.time() if row is None else float(row[1])

    def check(self) -> bool:
        with self._lock:
            self._con.execute("SELECT 1").fetchone()
        return True

    def reset(self) -> int | None:
        with self._lock:
            return self._con.execute("DELETE FROM windows").rowcount

    def clear(self, key: str) -> None:
        with self._lock:
            self._con.execute("DELETE FROM windows WHERE key = ?", (key,))

    def close(self) -> None:
        self._con.close()

    def _live(self, key: str) -> tuple[int, float] | None:
        with self._lock:
            row: tuple[int, float] | None = self._con.execute(
                "SELECT hits, expires_at FROM windows WHERE key = ? AND expires_at > ?",
                (key, time.time()),
            ).fetchone()
        return row


class KeyRateLimit:
    """The configured limits (e.g. ``50/second`` or ``10/second;300/minute``), per key."""

    def __init__(self, limit: str, path: Path) -> None:
        self.items = parse_many(limit)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.storage = SqliteStorage(f"sqlite://{urllib.parse.quote(str(path.resolve()))}")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open rate limit counters {path}: {exc}") from exc
        self.limiter = FixedWindowRateLimiter(self.storage)

    def hit(self, key_id: str) -> None:
        """Count one request of the key; raises ``RateLimited`` once a limit is used up."""
        try:
            for item in self.items:
                if not self.limiter.hit(item, key_id):
                    reset = self.limiter.get_window_stats(item, key_id).reset_time
                    wait = max(1, math.ceil(reset - time.time()))
                    raise RateLimited(
                        f"rate limit of {item} for this API key exceeded; retry in {wait} s",
                        wait,
                    )
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"rate limit counters unavailable: {exc}") from exc

    def close(self) -> None:
        self.storage.close()
