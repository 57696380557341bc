"""An engine made of several processes (Druid: ZooKeeper and four Druid services).

Each process (a *role*) has its own pid file and log under the engine's directory, so
each is verified and signalled by its own record, and one that died is started again
alone while the others keep running. Roles start in *stages*: a stage starts once the
one before answers (Druid's services need ZooKeeper), and stop in the reverse order,
every process of a stage signalled at once so that their shutdowns overlap.

To the rest of ``engines`` a group is one ``Engine``: ``up`` starts what is missing
and waits until every role answers; ``running`` is a record while any role runs (so
``down`` stops a group that is half up); ``status`` adds one entry per role.
"""

from __future__ import annotations

import signal
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from engines.base import Engine, log_tail
from engines.process import PidFile, ProcessRecord
from tally.errors import EngineError


class ProcessGroupEngine(Engine):
    """Subclasses name their ``stages`` and say how to configure, start and probe a role."""

    stages: ClassVar[tuple[tuple[str, ...], ...]]
    primary: ClassVar[str]  # the role whose pid is the engine's ``pid``

    def __init__(self, data_dir: Path, home: Path | None = None) -> None:
        super().__init__(data_dir, home)
        self.pid_files = {
            role: PidFile(self.dir / f"{role}.pid", f"{self.name}'s {role} that tally started")
            for role in self.roles
        }
        self.pid_file = self.pid_files[self.primary]
        self.log = self.role_log(self.primary)
        self._waiting: str | None = None  # the role that last did not answer

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for stage in self.stages for role in stage)

    def role_log(self, role: str) -> Path:
        return self.dir / f"{role}.log"

    # -- what each group provides ---------------------------------------------------------

    @abstractmethod
    def configure(self) -> None:
        """Before any role starts: first time, choose ports; every time, write configs."""

    @abstractmethod
    def start_role(self, role: str, artifacts: Path) -> ProcessRecord:
        """Launch one role (configured already); do not wait."""

    @abstractmethod
    def role_answers(self, role: str, timeout_s: float) -> bool:
        """One real round trip to ``role`` (it serves, and is part of this group)."""

    # -- Engine ---------------------------------------------------------------------------

    def role_running(self, role: str) -> ProcessRecord | None:
        return self.pid_files[role].running()

    def running(self) -> ProcessRecord | None:
        """The primary's record, else any running role's; None once every role is down."""
        for role in (self.primary, *self.roles):
            rec = self.role_running(role)
            if rec is not None:
                return rec
        return None

    def start(self, artifacts: Path) -> ProcessRecord:
        """Start every role that is not running, stage by stage; returns the primary's."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.configure()
        deadline = time.monotonic() + self.start_timeout_s
        for stage in self.stages:
            for role in stage:
                if self.role_running(role) is None:
                    self.pid_files[role].write(self.start_role(role, artifacts))
            for role in stage:
                self._await(role, deadline)
        rec = self.role_running(self.primary)
        if rec is None:
            raise EngineError(self._exited_line(self.primary))
        return rec

    def launch(self, artifacts: Path) -> bool:
        if all(self.role_running(role) is not None for role in self.roles):
            return False
        try:
            self.start(artifacts)
        except EngineError:
            self._stop_locked()  # none of it half up: the next `up` starts afresh
            raise
        return True

    def _await(self, role: str, deadline: float) -> None:
        while not self.role_answers(role, max(0.1, min(deadline - time.monotonic(), 2.0))):
            if self.role_running(role) is None:
                raise EngineError(self._exited_line(role))
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"{self.name}'s {role} did not answer within {self.start_timeout_s:g}s"
                    f" (log {self.role_log(role)})"
                )

    def _exited_line(self, role: str) -> str:
        log = self.role_log(role)
        return f"{self.name}'s {role} exited during start-up (log {log}): {log_tail(log)}"

    def exited(self) -> str | None:
        for role in self.roles:
            if self.role_running(role) is None:
                return self._exited_line(role)
        return None

    def answers(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for role in self.roles:
            if not self.role_answers(role, max(0.1, deadline - time.monotonic())):
                self._waiting = role
                return False
        self._waiting = None
        return True

    def pending(self) -> str:
        role = self._waiting or self.primary
        return f"waiting for its {role}, log {self.role_log(role)}"

    def _stop_locked(self) -> None:
        for stage in reversed(self.stages):
            found = {role: self.pid_files[role].check().record for role in stage}
            signalled = [
                rec for rec in found.values() if rec is not None and rec.signal(signal.SIGTERM)
            ]
            deadline = time.monotonic() + self.stop_grace_s
            for rec in signalled:
                if not rec.wait_exit(max(0.0, deadline - time.monotonic())):
                    rec.signal(signal.SIGKILL)
                    rec.wait_exit(10.0)
            for role in stage:
                self.pid_files[role].clear()

    def status(self) -> dict[str, Any]:
        records = {role: self.role_running(role) for role in self.roles}
        primary = records[self.primary]
        return {
            "pid": primary.pid if primary is not None else None,
            "running": all(rec is not None for rec in records.values()),
            **self.describe(),
            "processes": {
                role: {
                    "pid": rec.pid if rec is not None else None,
                    "running": rec is not None,
                    "log": str(self.role_log(role)),
                }
                for role, rec in records.items()
            },
            "log": str(self.log),
            "data": str(self.dir),
        }
