"""API keys: shown once, stored only as hashes, scoped to one merchant or to operators.

A key reads ``tly_<id>_<secret>``: the id finds the row, the secret is 32 random bytes
whose SHA-256 is all that is stored (a secret that random needs no slow hash: there is
nothing to guess). Keys live in their own small SQLite file beside the catalog, so the
API never opens the store for writing and revoking a key never contends with ingestion.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from tally.errors import InvalidArgument, StoreUnavailable

PREFIX = "tly"
ADMIN = "admin"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    merchant_id TEXT,            -- NULL for operator (admin) keys
    scope TEXT NOT NULL,         -- 'merchant' or 'admin'
    secret_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(frozen=True)
class Principal:
    key_id: str
    merchant_id: str | None
    scope: str

    @property
    def is_admin(self) -> bool:
        return self.scope == ADMIN


@dataclass(frozen=True)
class KeyInfo:
    id: str
    merchant_id: str | None
    scope: str
    created_at: float
    revoked_at: float | None


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA busy_timeout=10000")
            self._con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open key store {path}: {exc}") from exc

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, merchant_id: str | None, *, admin: bool = False) -> tuple[KeyInfo, str]:
        """A new key; the returned secret is the only copy there will ever be."""
        if admin == (merchant_id is not None):
            raise InvalidArgument("a key is either for one merchant or an admin key")
        if merchant_id is not None and not merchant_id.strip():
            raise InvalidArgument("merchant id must not be empty")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        info = KeyInfo(key_id, merchant_id, ADMIN if admin else "merchant", time.time(), None)
        self._con.execute(
            "INSERT INTO api_keys (id, merchant_id, scope, secret_sha256, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (info.id, info.merchant_id, info.scope, _digest(secret), info.created_at),
        )
        return info, f"{PREFIX}_{key_id}_{secret}"

    def list(self) -> list[KeyInfo]:
        rows = self._con.execute(
            "SELECT id, merchant_id, scope, created_at, revoked_at FROM api_keys"
            " ORDER BY created_at"
        )
        return [KeyInfo(*r) for r in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        cur = self._con.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (time.time(), key_id),
        )
        if cur.rowcount == 0:
            known = {k.id for k in self.list()}
            why = "is already revoked" if key_id in known else "does not exist"
            raise InvalidArgument(f"key {key_id!r} {why}")
        return next(k for k in self.list() if k.id == key_id)

    def verify(self, presented: str) -> Principal | None:
        """The key's principal, or None for anything that is not a live key."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        _, key_id, secret = parts
        row = self._con.execute(
            "SELECT merchant_id, scope, secret_sha256 FROM api_keys"
            " WHERE id = ? AND revoked_at IS NULL",
            (key_id,),
        ).fetchone()
        if row is None or not hmac.compare_digest(row[2], _digest(secret)):
            return None
        return Principal(key_id, row[0], row[1])


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
