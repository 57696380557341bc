"""Stream Load: one HTTP PUT per table and batch, exactly once by its label.

``PUT /api/{db}/{table}/_stream_load`` on the FE answers ``307`` with a BE's address;
the request is sent again there **with the credentials** (HTTP clients drop
Authorization on a cross-host redirect, and the BE then refuses it). The body is a
JSON array (``strip_outer_array``), ``Expect: 100-continue`` as StarRocks asks.

What each ``Status`` means here (StarRocks' documented response fields):

* ``Success``: committed and visible.
* ``Publish Timeout``: committed, not visible yet. Never loaded again (it would be
  refused by its label anyway); waited for until ``get_load_state`` says VISIBLE,
  because the next batch plans its deltas against what it reads.
* ``Label Already Exists``: a replay. Reconciled through ``GET
  /api/{db}/get_load_state?label=``: VISIBLE is done, PREPARE/COMMITTED are waited
  for, and a label StarRocks no longer knows is loaded again.
* ``Fail``: rows at fault (``NumberFilteredRows`` > 0 with an ``ErrorURL``) raise
  :class:`RowsRejected` with the reasons the ErrorURL gives; a failure the docs call
  transient (timeouts, too many versions, no backend) is :class:`StoreUnavailable`
  (retried with the same label: a failed load frees it); anything else is terminal.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from tally.errors import StoreError, StoreUnavailable
from tally.settings import StarRocksSettings

_TRANSIENT = re.compile(
    r"timeout|timed out|too many versions|too many tablet versions|service unavailable|"
    r"no backend|backend not found|no available|busy|memory exceed|cancelled by|"
    r"rpc failed|connection refused|try again",
    re.IGNORECASE,
)
_PRESSURE = re.compile(r"too many (tablet )?versions", re.IGNORECASE)
_VISIBLE_WAIT_S = 0.2


@dataclass(frozen=True)
class LoadResult:
    label: str
    status: str  # Success | Publish Timeout | Label Already Exists (reconciled)
    loaded_rows: int
    txn_id: int | None
    replayed: bool  # the label had been loaded before: this call changed nothing


class RowsRejected(StoreError):
    """StarRocks refused some rows (``NumberFilteredRows``): nothing was loaded, the
    label is free again. ``reasons`` are the ErrorURL's lines, one per row."""

    code = "rows_rejected"

    def __init__(self, message: str, filtered: int, reasons: list[str]) -> None:
        super().__init__(message)
        self.filtered = filtered
        self.reasons = reasons


def classify_failure(message: str) -> type[StoreError]:
    """A ``Fail`` that may pass by itself (retried) or that will not (terminal)."""
    return StoreUnavailable if _TRANSIENT.search(message or "") else StoreError


class StreamLoader:
    def __init__(self, settings: StarRocksSettings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.base = settings.stream_load_url
        self._client = client or httpx.Client(timeout=settings.request_timeout_s)
        password = settings.password.get_secret_value() if settings.password else ""
        token = base64.b64encode(f"{settings.user}:{password}".encode()).decode()
        self._auth = f"Basic {token}"

    def close(self) -> None:
        self._client.close()

    # --- loading ---------------------------------------------------------------------

    def load(
        self,
        table: str,
        rows: Sequence[Mapping[str, Any]],
        label: str,
        *,
        merge_condition: str | None = None,
        partial_columns: Sequence[str] | None = None,
    ) -> LoadResult:
        """Load ``rows`` into ``table`` under ``label``, exactly once."""
        headers = {
            "label": label,
            "format": "json",
            "strip_outer_array": "true",
            "Expect": "100-continue",
            "Content-Type": "application/json",
            "timeout": str(int(self.settings.request_timeout_s)),
        }
        if merge_condition is not None:
            headers["merge_condition"] = merge_condition
        if partial_columns is not None:
            headers["partial_update"] = "true"
            headers["columns"] = ",".join(partial_columns)
        body = orjson.dumps(list(rows))
        url = f"{self.base}/api/{self.settings.database}/{table}/_stream_load"
        reply = self._request("PUT", url, content=body, headers=headers)
        status = str(reply.get("Status", ""))
        loaded = int(reply.get("NumberLoadedRows") or 0)
        txn = reply.get("TxnId")
        if status == "Success":
            return LoadResult(label, status, loaded, txn, replayed=False)
        if status == "Publish Timeout":
            self.wait_visible(label)
            return LoadResult(label, status, loaded, txn, replayed=False)
        if status == "Label Already Exists":
            state = self.wait_visible(label)
            if state == "UNKNOWN":  # no longer known (expired): load it again
                return self.load(
                    table,
                    rows,
                    label,
                    merge_condition=merge_condition,
                    partial_columns=partial_columns,
                )
            return LoadResult(label, status, 0, txn, replayed=True)
        message = str(reply.get("Message") or reply.get("msg") or reply)
        filtered = int(reply.get("NumberFilteredRows") or 0)
        if filtered and reply.get("ErrorURL"):
            reasons = self._error_rows(str(reply["ErrorURL"]))
            raise RowsRejected(
                f"{table}: StarRocks filtered {filtered} row(s): {message}", filtered, reasons
            )
        if _PRESSURE.search(message):
            message += (
                " (version pressure: StarRocks' compaction is behind the loads;"
                " `tally compaction status` shows the partitions due)"
            )
        cls = classify_failure(message)
        raise cls(f"{table}: stream load {label} failed: {message}")

    def wait_visible(self, label: str) -> str:
        """Wait until the load ``label`` is VISIBLE (or known to be ABORTED/UNKNOWN);
        returns that state. A wait longer than the request timeout is transient."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            state = self.load_state(label)
            if state in {"VISIBLE", "ABORTED", "UNKNOWN"}:
                if state == "ABORTED":
                    raise StoreUnavailable(f"stream load {label} was aborted; loading it again")
                return state
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"stream load {label} still {state}: not visible yet")
            time.sleep(_VISIBLE_WAIT_S)

    def load_state(self, label: str) -> str:
        url = f"{self.base}/api/{self.settings.database}/get_load_state"
        reply = self._request("GET", url, params={"label": label})
        if reply.get("status") not in (None, "OK", "Success"):
            raise StoreUnavailable(f"get_load_state {label}: {reply.get('msg') or reply}")
        return str(reply.get("state", "UNKNOWN"))

    # --- HTTP ------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """One request, following the FE's redirect to a BE by hand so that the
        Authorization header goes along (up to 3 hops)."""
        hdrs = {**(headers or {}), "Authorization": self._auth}
        for _hop in range(3):
            try:
                resp = self._client.request(
                    method,
                    url,
                    content=content,
                    headers=hdrs,
                    params=params,
                    follow_redirects=False,
                )
            except httpx.HTTPError as exc:
                host = urlsplit(url).netloc
                raise StoreUnavailable(f"StarRocks at {host} unreachable: {exc}") from exc
            if resp.status_code in (301, 302, 303, 307, 308) and "location" in resp.headers:
                url, params = resp.headers["location"], None  # the query string is in it
                continue
            if resp.status_code in (401, 403):
                raise StoreError(f"StarRocks refused the credentials of {self.settings.user!r}")
            if resp.status_code >= 500:
                raise StoreUnavailable(
                    f"StarRocks answered HTTP {resp.status_code}: {resp.text[:200]}"
                )
            try:
                data = orjson.loads(resp.content)
            except orjson.JSONDecodeError as exc:
                raise StoreUnavailable(
                    f"StarRocks answered HTTP {resp.status_code} with no JSON: {resp.text[:200]}"
                ) from exc
            return data if isinstance(data, dict) else {"reply": data}
        raise StoreError(f"StarRocks redirected {method} {url} too many times")

    def _error_rows(self, url: str) -> list[str]:
        """The ErrorURL's lines (a reason and the row, per filtered row)."""
        try:
            resp = self._client.get(url, headers={"Authorization": self._auth})
        except httpx.HTTPError:
            return []
        return [line for line in resp.text.splitlines() if line.strip()]
