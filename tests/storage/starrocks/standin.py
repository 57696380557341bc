"""A local stand-in for StarRocks, following its documented behaviour (tests only).

No StarRocks server runs on this machine, so the backend is tested against this:

* an **FE** HTTP server: ``PUT /api/{db}/{table}/_stream_load`` answers ``307`` to
  the BE (after checking the credentials, as the FE does), and
  ``GET /api/{db}/get_load_state?label=`` answers a label's state;
* a **BE** HTTP server that performs the load: JSON arrays (``strip_outer_array``),
  labels (a used label answers "Label Already Exists" with ``ExistingJobStatus``; a
  failed load frees its label), ``merge_condition`` (an existing row is replaced
  only when the new row's column is ≥ the stored one), ``partial_update``, Primary
  Key upserts, Aggregate-key SUMs, rows filtered against the column types (a
  VARCHAR(n) longer than n bytes, a NULL in a NOT NULL column) failing the load
  with ``NumberFilteredRows`` and an ``ErrorURL`` whose lines name each row, and the
  response fields of StarRocks' Stream Load (TxnId, Label, Status, Message,
  NumberTotalRows, NumberLoadedRows, NumberFilteredRows, NumberUnselectedRows,
  LoadBytes, LoadTimeMs, ErrorURL);
* a **MySQL-protocol** server (mysql-mimic) executing what the backend sends: DDL
  is parsed with sqlglot's ``starrocks`` dialect into tables of DuckDB, ``ALTER
  TABLE … COMPACT`` is recorded, and queries are transpiled to DuckDB and run there.

Scripted faults (``fail_next``) answer the next loads of a table with a Publish
Timeout (committed, visible a few polls later) or a transient Fail.

What it does not prove, which each test says too: StarRocks' own SQL semantics and
planner (DuckDB runs the transpiled statement), its tablet versions and compaction,
its replication and publish protocol, its privileges (one user, all rights), its
exact error texts beyond the documented fields, and its performance.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import duckdb
import orjson
import sqlglot
from mysql_mimic import MysqlServer, Session
from mysql_mimic.auth import IdentityProvider, NativePasswordAuthPlugin, User
from mysql_mimic.errors import MysqlError
from sqlglot import exp

_DUCK = {"VARCHAR": "VARCHAR", "BIGINT": "BIGINT", "INT": "INTEGER", "DATETIME": "TIMESTAMP"}


@dataclass
class Column:
    name: str
    type: str  # DuckDB type
    nullable: bool
    length: int | None  # VARCHAR(n): bytes
    agg: str | None  # an Aggregate table's value column: SUM | MAX | MIN | REPLACE


@dataclass
class Model:
    name: str  # db.table
    kind: str  # primary | aggregate | duplicate
    columns: list[Column]
    keys: list[str]


@dataclass
class Label:
    state: str  # PREPARE | COMMITTED | VISIBLE
    txn: int
    polls: int = 0
    apply: Any = None  # what makes a COMMITTED load visible


@dataclass
class Stats:
    loads: list[dict[str, Any]] = field(default_factory=list)  # every load request
    compactions: list[str] = field(default_factory=list)
    be_without_auth: int = 0


class StandIn:
    def __init__(self, user: str = "root", password: str = "standin") -> None:
        self.user, self.password = user, password
        self.db = duckdb.connect()
        self.lock = threading.RLock()
        self.models: dict[str, Model] = {}
        self.schemas: set[str] = set()
        self.labels: dict[tuple[str, str], Label] = {}
        self.faults: dict[str, list[str]] = {}
        self.kills: list[list[Any]] = []
        self.killed: list[tuple[str, int]] = []
        self.error_logs: dict[str, list[str]] = {}
        self.stats = Stats()
        self._txn = itertools.count(1000)
        self._servers: list[ThreadingHTTPServer] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.fe_port = self.be_port = self.query_port = 0

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> StandIn:
        be = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, fe=False))
        fe = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, fe=True))
        self.be_port, self.fe_port = be.server_address[1], fe.server_address[1]
        for srv in (be, fe):
            self._servers.append(srv)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
        ready = threading.Event()
        threading.Thread(target=self._mysql, args=(ready,), daemon=True).start()
        ready.wait(10)
        return self

    def _mysql(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = MysqlServer(session_factory=lambda: _Session(self), identity_provider=_Users(self))

        async def run() -> None:
            await server.start_server(host="127.0.0.1", port=0)
            assert server._server is not None
            self.query_port = server._server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        with contextlib.suppress(RuntimeError):  # stop() ends the loop under it
            loop.run_until_complete(run())

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)

    def reset(self) -> None:
        with self.lock:
            for name in list(self.models):
                self.db.execute(f"DROP TABLE IF EXISTS {_duck_name(name)}")
            self.models.clear()
            self.labels.clear()
            self.faults.clear()
            self.stats = Stats()

    def kill_on(self, table: str, nth: int, pid: int) -> None:
        """SIGKILL ``pid`` when it sends its ``nth`` load of ``table`` from now on,
        before that load is applied: a crash between two of a batch's loads."""
        self.kills.append([table, nth, pid])

    def fail_next(self, table: str, *kinds: str) -> None:
        """The next loads of ``table`` answer, in turn: ``publish_timeout``,
        ``transient`` (a timeout) or ``too_many_versions``."""
        self.faults.setdefault(table, []).extend(kinds)

    # --- SQL -------------------------------------------------------------------------

    def execute(
        self, sql: str, database: str | None = None
    ) -> tuple[list[tuple[Any, ...]], list[str]]:
        """Run one statement; unqualified tables are the session's database's."""
        tree = sqlglot.parse_one(sql, read="starrocks")
        with self.lock:
            if isinstance(tree, exp.Create):
                self._create(tree)
                return [], []
            if isinstance(tree, exp.Command) and "COMPACT" in sql.upper():
                self.stats.compactions.append(sql)
                return [], []
            cur = self.db.cursor()
            if database is not None and database in self.schemas:
                cur.execute(f"SET schema = '{database}'")
            cur.execute(tree.sql("duckdb"))
            names = [d[0] for d in cur.description or ()]
            return [tuple(r) for r in cur.fetchall()], names

    def _create(self, tree: exp.Create) -> None:
        if tree.args.get("kind") == "DATABASE":
            self.db.execute(f'CREATE SCHEMA IF NOT EXISTS "{tree.this.name}"')
            self.schemas.add(tree.this.name)
            return
        schema = tree.this
        table = schema.this
        name = f"{table.db}.{table.name}"
        if name in self.models:
            return  # IF NOT EXISTS
        columns: list[Column] = []
        keys: list[str] = []
        kind = "duplicate"
        for item in schema.expressions:
            if isinstance(item, exp.PrimaryKey):
                kind, keys = "primary", [e.name for e in item.expressions]
                continue
            dtype = item.args["kind"]
            base = dtype.this.name if hasattr(dtype.this, "name") else str(dtype.this)
            base = base.replace("DType.", "")
            params = dtype.expressions
            length = int(params[0].this.this) if base == "VARCHAR" and params else None
            constraints = item.args.get("constraints") or []
            agg = next(
                (
                    c.args["kind"].name.upper()
                    for c in constraints
                    if isinstance(c.args.get("kind"), exp.Var)
                ),
                None,
            )
            not_null = any(
                isinstance(c.args.get("kind"), exp.NotNullColumnConstraint)
                and not c.args["kind"].args.get("allow_null")  # "NULL" parses as one too
                for c in constraints
            )
            columns.append(Column(item.name, _DUCK.get(base, base), not not_null, length, agg))
        for prop in (tree.args.get("properties") or exp.Properties(expressions=[])).expressions:
            if isinstance(prop, exp.AggregateKeyProperty):
                kind, keys = "aggregate", [e.name for e in prop.expressions]
        cols = ", ".join(f'"{c.name}" {c.type}' for c in columns)
        pk = f", PRIMARY KEY ({', '.join(chr(34) + k + chr(34) for k in keys)})" if keys else ""
        self.db.execute(f"CREATE TABLE {_duck_name(name)} ({cols}{pk})")
        self.models[name] = Model(name, kind, columns, keys)

    # --- Stream Load -----------------------------------------------------------------

    def load(self, db: str, table: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
        started = time.monotonic()
        label = headers.get("label") or f"auto_{uuid.uuid4().hex}"
        reply: dict[str, Any] = {"Label": label}
        with self.lock:
            for kill in list(self.kills):
                if kill[0] == table:
                    kill[1] -= 1
                    if kill[1] <= 0:
                        self.kills.remove(kill)
                        os.kill(kill[2], signal.SIGKILL)
                        self.killed.append((table, kill[2]))
                        return reply | {"Status": "Fail", "Message": "the client was killed"}
            self.stats.loads.append({"db": db, "table": table, "label": label, "headers": headers})
            used = self.labels.get((db, label))
            if used is not None:
                status = "FINISHED" if used.state == "VISIBLE" else "RUNNING"
                return reply | {
                    "TxnId": used.txn,
                    "Status": "Label Already Exists",
                    "ExistingJobStatus": status,
                    "Message": f"Label [{label}] has already been used.",
                }
            model = self.models.get(f"{db}.{table}")
            if model is None:
                return reply | {"Status": "Fail", "Message": f"unknown table, tableName={table}"}
            queued = self.faults.get(table)
            fault = queued.pop(0) if queued else None
            if fault == "too_many_versions":
                return reply | {
                    "TxnId": next(self._txn),
                    "Status": "Fail",
                    "Message": (
                        "Too many versions. tablet_id: 10086, version_count: 1001, limit: 1000"
                    ),
                }
            if fault == "transient":
                return reply | {
                    "TxnId": next(self._txn),
                    "Status": "Fail",
                    "Message": "[E1008]Reached timeout=300000ms @127.0.0.1:8060",
                    "NumberTotalRows": 0,
                    "NumberLoadedRows": 0,
                    "NumberFilteredRows": 0,
                }
            rows = orjson.loads(body)
            if isinstance(rows, dict):
                rows = [rows]
            partial = headers.get("partial_update") == "true"
            listed = headers.get("columns", "").split(",") if partial else None
            bad = [r for r in (self._invalid(model, row, listed) for row in rows) if r]
            reply |= {
                "NumberTotalRows": len(rows),
                "NumberLoadedRows": len(rows) - len(bad),
                "NumberFilteredRows": len(bad),
                "NumberUnselectedRows": 0,
                "LoadBytes": len(body),
            }
            if bad:
                log_id = uuid.uuid4().hex
                self.error_logs[log_id] = bad
                return reply | {
                    "TxnId": next(self._txn),
                    "Status": "Fail",
                    "Message": "too many filtered rows",
                    "ErrorURL": f"http://127.0.0.1:{self.be_port}/api/_load_error_log?file={log_id}",
                }
            txn = next(self._txn)

            def apply() -> None:
                self._apply(model, rows, headers.get("merge_condition"), listed)

            if fault == "publish_timeout":
                self.labels[(db, label)] = Label("COMMITTED", txn, apply=apply)
                status, message = (
                    "Publish Timeout",
                    "transaction commit successfully, BUT data will be visible later",
                )
            else:
                apply()
                self.labels[(db, label)] = Label("VISIBLE", txn)
                status, message = "Success", "OK"
        ms = int((time.monotonic() - started) * 1000)
        return reply | {"TxnId": txn, "Status": status, "Message": message, "LoadTimeMs": ms}

    def load_state(self, db: str, label: str) -> dict[str, Any]:
        with self.lock:
            used = self.labels.get((db, label))
            if used is None:
                return {"status": "OK", "msg": "Success", "state": "UNKNOWN"}
            used.polls += 1
            if used.state == "COMMITTED" and used.polls >= 2:
                used.apply()
                used.state = "VISIBLE"
            return {"status": "OK", "msg": "Success", "state": used.state}

    @staticmethod
    def _invalid(model: Model, row: dict[str, Any], listed: list[str] | None) -> str | None:
        for col in model.columns:
            if listed is not None and col.name not in listed:
                continue
            value = row.get(col.name)
            if value is None:
                if not col.nullable:
                    return (
                        f"Error: NULL value in non-nullable column '{col.name}'."
                        f" Row: {orjson.dumps(row).decode()}"
                    )
                continue
            if col.length is not None and len(str(value).encode()) > col.length:
                return (
                    f"Error: Value length beyond limit. Column: {col.name}, Limit: {col.length}."
                    f" Row: {orjson.dumps(row).decode()}"
                )
        return None

    def _apply(
        self, model: Model, rows: list[dict[str, Any]], merge: str | None, listed: list[str] | None
    ) -> None:
        cols = [c for c in model.columns if listed is None or c.name in listed]
        names = [c.name for c in cols]
        if model.kind == "aggregate":
            rows = _summed(model, rows)
        elif model.kind == "primary":
            rows = _last_per_key(model, rows, merge)
        if not rows:
            return
        values = ", ".join("(" + ", ".join("?" for _ in cols) + ")" for _ in rows)
        casts = ", ".join(f'CAST(v."col{i}" AS {c.type}) AS "{c.name}"' for i, c in enumerate(cols))
        aliases = ", ".join(f'"col{i}"' for i in range(len(cols)))
        params = [_param(row.get(c.name), c) for row in rows for c in cols]
        target = _duck_name(model.name)
        source = f"SELECT {casts} FROM (VALUES {values}) AS v({aliases})"
        quoted = ", ".join(f'"{n}"' for n in names)
        if model.kind == "duplicate" or not model.keys:
            self.db.execute(f"INSERT INTO {target} ({quoted}) {source}", params)
            return
        keys = ", ".join(f'"{k}"' for k in model.keys)
        others = [n for n in names if n not in model.keys]
        if model.kind == "aggregate":
            sets = ", ".join(_aggregated(target, c) for c in cols if c.name in others)
        else:
            sets = ", ".join(f'"{n}" = EXCLUDED."{n}"' for n in others)
        where = f' WHERE EXCLUDED."{merge}" >= {target}."{merge}"' if merge else ""
        if listed is not None:  # partial update: existing rows only
            assignments = ", ".join(f'"{n}" = s."{n}"' for n in others)
            match = " AND ".join(f'{target}."{k}" = s."{k}"' for k in model.keys)
            self.db.execute(
                f"UPDATE {target} SET {assignments} FROM ({source}) AS s WHERE {match}", params
            )
            return
        action = f"DO UPDATE SET {sets}{where}" if others else "DO NOTHING"
        self.db.execute(
            f"INSERT INTO {target} ({quoted}) {source} ON CONFLICT ({keys}) {action}", params
        )


def _duck_name(name: str) -> str:
    db, table = name.split(".", 1)
    return f'"{db}"."{table}"'


def _param(value: Any, col: Column) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    return str(value) if col.type in ("VARCHAR", "TIMESTAMP") else value


def _aggregated(target: str, col: Column) -> str:
    new, old = f'EXCLUDED."{col.name}"', f'{target}."{col.name}"'
    value = {
        "SUM": f"{old} + {new}",
        "MAX": f"greatest({old}, {new})",
        "MIN": f"least({old}, {new})",
    }
    return f'"{col.name}" = {value.get(col.agg or "REPLACE", new)}'


def _summed(model: Model, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one load with the same aggregate key, combined as StarRocks does."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in model.keys)
        have = out.get(key)
        if have is None:
            out[key] = dict(row)
            continue
        for col in model.columns:
            a: Any = have.get(col.name)
            b: Any = row.get(col.name)
            if col.agg == "SUM":
                have[col.name] = int(a or 0) + int(b or 0)
            elif col.agg == "MAX":
                have[col.name] = max(a, b)
            elif col.agg == "MIN":
                have[col.name] = min(a, b)
            elif col.agg == "REPLACE":
                have[col.name] = b
    return list(out.values())


def _last_per_key(
    model: Model, rows: list[dict[str, Any]], merge: str | None
) -> list[dict[str, Any]]:
    """Rows of one load applied in order: a later row with the same key replaces an
    earlier one (with ``merge_condition``, only when its column is ≥)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in model.keys)
        have = out.get(key)
        if have is None or merge is None or row[merge] >= have[merge]:
            out[key] = row
    return list(out.values())


class _Users(IdentityProvider):  # type: ignore[misc]
    """One user with a native password, as StarRocks' root has."""

    def __init__(self, standin: StandIn) -> None:
        self.standin = standin

    async def get_user(self, username: str) -> User | None:
        if username != self.standin.user:
            return None
        auth = NativePasswordAuthPlugin.create_auth_string(self.standin.password)
        return User(name=username, auth_string=auth, auth_plugin=NativePasswordAuthPlugin.name)


class _Session(Session):  # type: ignore[misc]
    dialect = "starrocks"

    def __init__(self, standin: StandIn) -> None:
        super().__init__()
        self.standin = standin

    async def schema(self) -> dict[str, Any]:
        """Databases and tables, for SHOW DATABASES / SHOW TABLES."""
        out: dict[str, dict[str, dict[str, str]]] = {}
        with self.standin.lock:
            for schema_name in self.standin.schemas:
                out.setdefault(schema_name, {})
            for model in self.standin.models.values():
                db, table = model.name.split(".", 1)
                out.setdefault(db, {})[table] = {c.name: c.type for c in model.columns}
        return out

    async def query(self, expression: exp.Expression, sql: str, attrs: dict[str, str]) -> Any:
        try:
            rows, names = self.standin.execute(expression.sql("starrocks"), self.database)
        except (duckdb.Error, sqlglot.errors.SqlglotError) as exc:
            raise MysqlError(str(exc).splitlines()[0]) from exc
        return rows, names


def _handler(standin: StandIn, *, fe: bool) -> type[BaseHTTPRequestHandler]:
    token = base64.b64encode(f"{standin.user}:{standin.password}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            return None

        def _reply(self, code: int, payload: Any, extra: dict[str, str] | None = None) -> None:
            body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            self.send_response(code)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Basic {token}"

        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = urlsplit(self.path).path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "api" or parts[3] != "_stream_load":
                self._reply(404, {"status": "FAILED", "msg": "not found"})
                return
            if not self._authorised():
                if not fe:
                    standin.stats.be_without_auth += 1
                self._reply(401, {"status": "FAILED", "msg": "Access denied"})
                return
            if fe:
                location = f"http://127.0.0.1:{standin.be_port}{self.path}"
                self._reply(307, b"", {"Location": location})
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._reply(200, standin.load(parts[1], parts[2], headers, body))

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            if parts[-1] == "_load_error_log":
                lines = standin.error_logs.get(query.get("file", ""), [])
                self._reply(200, "\n".join(lines).encode())
                return
            if not self._authorised():
                self._reply(401, {"status": "FAILED", "msg": "Access denied"})
                return
            if len(parts) == 3 and parts[2] == "get_load_state":
                self._reply(200, standin.load_state(parts[1], query.get("label", "")))
                return
            self._reply(404, {"status": "FAILED", "msg": "not found"})

    return Handler
