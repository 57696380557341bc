"""Druid's overlord and coordinator over HTTP (stdlib ``urllib``: no HTTP client is a
runtime dependency): supervisor specs, submitted idempotently, and the supervisor's
lifecycle (suspend, resume, reset, terminate); the watcher's compaction tasks and
early handoffs; the metadata store's used segments.

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
TASKS = "/druid/indexer/v1/task"


class _Service:
    """One Druid service's JSON API."""

    role = "overlord"

    def __init__(self, settings: Settings) -> None:
        url = getattr(settings.druid, f"{self.role}_url")
        if not url:
            env = f"TALLY_DRUID__{self.role.upper()}_URL"
            raise DruidUnavailable(
                f"druid.{self.role}_url is not set ({env}, e.g. http://127.0.0.1:8081)"
            )
        self.url = str(url).rstrip("/")
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
                    f"Druid {self.role} at {self.url}: {method} {path}: HTTP {exc.code}:"
                    f" {text[:300]}"
                ) from exc
            return exc.code, _json(text.encode()) if text else None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DruidUnavailable(
                f"Druid {self.role} at {self.url} unreachable: {reason}"
            ) from exc


class Overlord(_Service):
    """Supervisor specs and their lifecycle."""

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


class Tasks(_Service):
    """Batch tasks (the watcher's compactions) and early handoff of streaming tasks."""

    def submit(self, spec: dict[str, Any]) -> str:
        """The id of the submitted task. Submitting an id Druid already knows is
        refused (400), which makes a deterministic id a guard against a double submit."""
        status, body = self._request("POST", TASKS, spec)
        if status != 200 or not isinstance(body, dict) or "task" not in body:
            detail = body.get("error") if isinstance(body, dict) else body
            raise StoreError(f"Druid refused the task {spec.get('id')}: {detail}")
        return str(body["task"])

    def status(self, task_id: str) -> dict[str, Any] | None:
        """The task's status object (``status``: RUNNING, SUCCESS or FAILED;
        ``errorMsg``), None if Druid does not know it."""
        quoted = urllib.parse.quote(task_id, safe="")
        status, body = self._request("GET", f"{TASKS}/{quoted}/status")
        if status == 404:
            return None
        got = body.get("status") if isinstance(body, dict) else None
        if status != 200 or not isinstance(got, dict):
            raise StoreError(f"Druid overlord: GET task {task_id} status: HTTP {status}")
        return got

    def shutdown(self, task_id: str) -> None:
        quoted = urllib.parse.quote(task_id, safe="")
        self._request("POST", f"{TASKS}/{quoted}/shutdown")

    def handoff(self, supervisor_id: str, groups: list[int]) -> bool:
        """Ask the supervisor's task groups to publish what they hold now and hand
        over to new tasks (Druid 30+); False if there is no such supervisor."""
        quoted = urllib.parse.quote(supervisor_id, safe="")
        path = f"{SUPERVISORS}/{quoted}/taskGroups/handoff"
        status, body = self._request("POST", path, {"taskGroupIds": groups})
        if status == 404:
            return False
        if status not in (200, 202):
            raise StoreError(f"Druid overlord: handoff {supervisor_id}: HTTP {status}: {body}")
        return True


class Coordinator(_Service):
    """The metadata store's view of segments, read directly (not the coordinator's
    cache, which polls the metadata store every ``pollDuration``)."""

    role = "coordinator"

    def used_segments(self, datasource: str, interval: str) -> list[dict[str, Any]]:
        """Every used segment of ``datasource`` overlapping ``interval`` (ISO
        ``start/end``), overshadowed ones included, with its shard spec and size."""
        quoted = urllib.parse.quote(datasource, safe="")
        path = f"/druid/coordinator/v1/metadata/datasources/{quoted}/segments?full"
        status, body = self._request("POST", path, [interval])
        if status == 404 or body is None:
            return []
        if status != 200 or not isinstance(body, list):
            raise StoreError(f"Druid coordinator: segments of {datasource}: HTTP {status}")
        return [s for s in body if isinstance(s, dict)]
