"""Where the StarRocks tests run: the local stand-in, or a real StarRocks.

``TALLY_TEST_STARROCKS=mysql://USER:PASSWORD@HOST:9030?http=http://HOST:8030`` runs
the same tests against a real StarRocks (FE query port and FE HTTP address); unset,
they run on the stand-in (``tests.storage.starrocks.standin``), started once per
session. Each test gets a database of its own, its tables created as
``tally starrocks apply`` creates them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr

from storage.starrocks.connection import Connection
from storage.starrocks.ddl import statements
from tally.settings import Settings, StarRocksSettings, StoreSettings
from tally.specs import SpecRegistry
from tests.storage.starrocks.standin import StandIn

ENV = "TALLY_TEST_STARROCKS"
STANDIN_LIMITS = (
    "on the stand-in this does not prove StarRocks' own SQL semantics or planner"
    " (DuckDB runs the transpiled statements), its tablet versions, compaction,"
    " replication or publish protocol, nor its performance"
)


@dataclass
class Target:
    base: StarRocksSettings
    standin: StandIn | None  # None: a real StarRocks

    def settings(
        self, data_dir: Path, registry: SpecRegistry, base: Settings | None = None
    ) -> Settings:
        """``base`` (default: plain settings on ``data_dir``) on a fresh database
        holding every table of ``registry``."""
        sr = self.base.model_copy(update={"database": f"t{uuid.uuid4().hex[:12]}"})
        store = StoreSettings(backend="starrocks", gc_grace_s=0.0, orphan_grace_s=0.0)
        settings = (base or Settings(data_dir=data_dir)).model_copy(
            update={"starrocks": sr, "store": store}
        )
        conn = Connection(sr, database=False)
        try:
            for st in statements(settings, list(registry)):
                conn.execute(st.sql)
        finally:
            conn.close()
        return settings


def real() -> StarRocksSettings | None:
    url = os.environ.get(ENV)
    if not url:
        return None
    parts = urlsplit(url)
    http = parse_qs(parts.query).get("http", [None])[0]
    return StarRocksSettings(
        host=parts.hostname or "127.0.0.1",
        query_port=parts.port or 9030,
        http_url=http,
        user=parts.username or "root",
        password=SecretStr(parts.password) if parts.password else None,
    )


def start() -> Target:
    found = real()
    if found is not None:
        return Target(found, None)
    standin = StandIn().start()
    base = StarRocksSettings(
        host="127.0.0.1",
        query_port=standin.query_port,
        http_url=f"http://127.0.0.1:{standin.fe_port}",
        user=standin.user,
        password=SecretStr(standin.password),
    )
    return Target(base, standin)
