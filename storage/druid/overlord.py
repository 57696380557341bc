"""Druid's overlord over HTTP (stdlib ``urllib``: no HTTP client is a runtime
dependency): supervisor specs, submitted idempotently, and the supervisor's lifecycle
(suspend, resume, reset, terminate).

Failures are translated here: not configured, unreachable or a 5xx is
``DruidUnavailable`` (the CLI says so in one line and exits 2); a spec Druid refuses
is a ``StoreError`` carrying Druid's own message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from storage.druid.supervisor import contains
from tally.errors import DruidUnavailable, StoreError
from tally.settings import Settings

SUPERVISORS = "/druid/indexer/v1/supervisor"


class Overlord:
    def __init__(self, settings: Settings) -> None:
        url = settings.druid.overlord_url
        if not url:
            raise DruidUnavailable(
                "druid.overlord_url is not set (TALLY_DRUID__OVERLORD_URL, e.g."
                " http://127.0.0.1:8081)"
            )
        self.url = url.rstrip("/")
        self.timeout_s = settings.druid.request_timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            if exc.code >= 500:
                raise DruidUnavailable(
                    f"Druid overlord at {self.url}: {method} {path}: HTTP {exc.code}: {text[:300]}"
                ) from exc
            return exc.code, _json(text.encode()) if text else None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DruidUnavailable(f"Druid overlord at {self.url} unreachable: {reason}") from exc

    def current(self, supervisor_id: str) -> dict[str, Any] | None:
        """The spec Druid holds for ``supervisor_id`` (None: no such supervisor)."""
        quoted = urllib.parse.quote(supervisor_id, safe="")
        status, body = self._request("GET", f"{SUPERVISORS}/{quoted}")
        if status == 404:
            return None
        if status != 200 or not isinstance(body, dict):
            raise StoreError(f"Druid overlord: GET supervisor {supervisor_id}: HTTP {status}")
        return body

    def status(self, supervisor_id: str) -> dict[str, Any] | None:
        """The ``payload`` of the supervisor's status (None: no such supervisor)."""
        quoted = urllib.parse.quote(supervisor_id, safe="")
        status, body = self._request("GET", f"{SUPERVISORS}/{quoted}/status")
        if status == 404:
            return None
        payload = body.get("payload") if isinstance(body, dict) else None
        if status != 200 or not isinstance(payload, dict):
            raise StoreError(
                f"Druid overlord: GET supervisor {supervisor_id} status: HTTP {status}"
            )
        return payload

    def terminate(self, supervisor_id: str) -> bool:
        """Stop the supervisor and its tasks (they publish what they read): False if
        there was no such supervisor."""
        return self.act(supervisor_id, "terminate")

    def act(self, supervisor_id: str, action: str) -> bool:
        """POST one of the supervisor's actions (``suspend``: its tasks publish and
        stop, offsets kept; ``resume``; ``reset``: its stored offsets are forgotten;
        ``terminate``): False if there is no such supervisor."""
        quoted = urllib.parse.quote(supervisor_id, safe="")
        status, body = self._request("POST", f"{SUPERVISORS}/{quoted}/{action}")
        if status == 404:
            return False
        if status != 200:
            raise StoreError(f"Druid overlord: {action} {supervisor_id}: HTTP {status}: {body}")
        return True

    def apply(self, supervisor_id: str, spec: dict[str, Any]) -> str:
        """Submit ``spec`` unless Druid already runs it: "unchanged" or "submitted".
        Druid replaces a supervisor with the same id in place (its tasks hand over and
        resume from the stored offsets), so submitting twice is harmless anyway."""
        current = self.current(supervisor_id)
        if current is not None and contains(current, spec):
            return "unchanged"
        status, body = self._request("POST", SUPERVISORS, spec)
        if status != 200:
            detail = body.get("error") if isinstance(body, dict) else body
            raise StoreError(f"Druid refused the supervisor spec {supervisor_id}: {detail}")
        return "submitted"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")
