"""Engine processes, identified by pid AND start time, so a recycled pid is never signalled.

A pid file outlives its process (a crash, a reboot); the kernel then hands that pid to
someone else. The start time in ``/proc/<pid>/stat`` (field 22, clock ticks since boot)
tells the two apart. Signals go through a pidfd opened before the check, so the
process checked is the process signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start ticks) of a live pid, or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessRecord | None:
        st = _stat(pid)
        return None if st is None else cls(pid, st[1])

    def alive(self) -> bool:
        """This very process still runs (not a zombie, not a stranger with its pid)."""
        st = _stat(self.pid)
        return st is not None and st[0] not in ("Z", "X") and st[1] == self.start_ticks

    def _pidfd(self) -> int | None:
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return None
        if not self.alive():  # checked after opening: the fd pins the process checked
            os.close(fd)
            return None
        return fd

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if this is still the recorded process; False if it is gone."""
        fd = self._pidfd()
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)
        return True

    def wait_exit(self, timeout_s: float) -> bool:
        """Block until the process ends (True) or ``timeout_s`` passes (False)."""
        fd = self._pidfd()
        if fd is None:
            return True
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + timeout_s
            while self.alive():  # a child of ours stays a zombie until reaped: not alive
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(min(left, 0.5) * 1000)
            return True
        finally:
            os.close(fd)

    def terminate(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only ever to the recorded process."""
        if self.signal(signal.SIGTERM) and not self.wait_exit(grace_s):
            self.signal(signal.SIGKILL)
            self.wait_exit(10.0)


class PidFile:
    """``{"pid", "start_ticks"}`` as JSON; unreadable or stale reads as no process."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> ProcessRecord | None:
        try:
            doc = json.loads(self.path.read_text())
            return ProcessRecord(int(doc["pid"]), int(doc["start_ticks"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running(self) -> ProcessRecord | None:
        rec = self.read()
        return rec if rec is not None and rec.alive() else None

    def write(self, rec: ProcessRecord) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": rec.pid, "start_ticks": rec.start_ticks}))
        tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def spawn(argv: Sequence[str], log: Path, cwd: Path) -> ProcessRecord:
    """Start ``argv`` detached (own session, so own process group), output appended to ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    rec = ProcessRecord.of(proc.pid)
    if rec is None:  # already gone: record it anyway, alive() will say it is not running
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
        return ProcessRecord(proc.pid, -1)
    return rec
