"""The catalog keeps each offset's log and last reset (schema v3), and a catalog an
older Tally wrote (v2: offsets only) is migrated in place, its offsets kept."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from storage.embedded.catalog import SCHEMA_VERSION, Catalog

TP = ("payments.v1", 0)


def test_a_v2_catalog_keeps_its_offsets_and_gains_their_log(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', 2), ('generation', 0), ('seq', 0);"
        "CREATE TABLE offsets (datasource TEXT NOT NULL, topic TEXT NOT NULL,"
        " partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, updated_at REAL NOT NULL,"
        " PRIMARY KEY (datasource, topic, partition));"
        "INSERT INTO offsets VALUES ('payments', 'payments.v1', 0, 42, 0);"
    )
    con.commit()
    con.close()
    catalog = Catalog(path)
    try:
        with catalog.read():
            assert catalog.positions("payments") == {TP: (42, None, None)}
            version = catalog._con.execute("SELECT v FROM meta WHERE k='schema_version'")
            assert version.fetchone()[0] == SCHEMA_VERSION == 4
        with catalog.write():
            assert catalog.check_and_set_offsets("payments", {TP: (42, 50, "id-1")}) == []
        with catalog.write():  # a batch naming no log keeps the recorded one
            assert catalog.check_and_set_offsets("payments", {TP: (50, 51, None)}) == []
        with catalog.read():
            assert catalog.positions("payments") == {TP: (51, "id-1", None)}
        with catalog.write():
            catalog.reset_positions("payments", {TP: (0, "id-2", "to earliest by ops at t")})
        with catalog.read():
            assert catalog.positions("payments") == {TP: (0, "id-2", "to earliest by ops at t")}
    finally:
        catalog.close()
