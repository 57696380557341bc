"""Local processes Tally started, recorded in a pid file, verified before they are signalled.

A pid file outlives its process (a crash, a reboot); the kernel then hands that pid to
someone else. So a record says who the process was: its start time (``/proc/<pid>/stat``
field 22, clock ticks since boot) and, where recorded, its command line. A pid whose
identity differs, that belongs to another user, or that the file cannot vouch for (it is
unreadable, or the development broker's old bare-integer format) is *stale*: reported
with a reason, never signalled. A zombie counts as gone. Signals go through a pidfd
opened before the check, so the process checked is the process signalled.

Linux only (/proc and pidfd), like the rest of the engines (``fcntl`` locks, JVMs on
loopback); there is no ``ps`` fallback.
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

from tally.errors import EngineError, EngineUnavailable

_GONE = "gone"  # a ``_why_not`` answer: no live process holds the pid


def _observe(pid: int) -> tuple[int, tuple[str, ...]] | None:
    """(start ticks, command line) of live ``pid``; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[k] is field k + 3
    if fields[0] in ("Z", "X"):  # exited, only waiting to be reaped
        return None
    return int(fields[19]), tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])


def _start_ticks(pid: int) -> int | None:
    """Start ticks of ``pid`` even while a zombie (its threads may still run); None if
    the pid is free."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_ticks: int
    cmdline: tuple[str, ...] | None = None  # None: not recorded, so not compared

    @classmethod
    def of(cls, pid: int, exec_timeout_s: float = 5.0) -> ProcessRecord | None:
        """Who ``pid`` (a process we started) is; None if no live process (a zombie is
        none) holds it.

        Popen returns before the kernel has finished exec: until then the command line
        reads empty, so it is waited for (without it, it is left unrecorded)."""
        deadline = time.monotonic() + exec_timeout_s
        while (now := _observe(pid)) is not None and not now[1]:
            if time.monotonic() > deadline:
                return cls(pid, now[0])
            time.sleep(0.001)
        return None if now is None else cls(pid, *now)

    def _why_not(self, fd: int) -> str | None:
        """None if pidfd ``fd`` is this very process, alive and ours to signal; else
        ``_GONE`` or why it is not ours."""
        try:
            signal.pidfd_send_signal(fd, 0)
        except ProcessLookupError:
            return _GONE
        except PermissionError:
            return "it belongs to another user"
        now = _observe(self.pid)
        if now is None:
            return _GONE
        if now[0] != self.start_ticks:
            return "its start time differs"
        if self.cmdline is not None and now[1] != self.cmdline:
            return "its command line differs"
        return None

    def _open(self) -> tuple[int | None, str | None]:
        """(a pidfd on this very process, None), or (None, ``_GONE`` or why not)."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None, _GONE
        except OSError as exc:
            return None, f"it cannot be verified ({exc.strerror})"
        why = self._why_not(fd)  # checked after opening: the fd pins the process checked
        if why is not None:
            os.close(fd)
            return None, why
        return fd, None

    def _verify(self) -> str | None:
        """None if this very process still runs and is ours; else ``_GONE`` or why not."""
        fd, why = self._open()
        if fd is not None:
            os.close(fd)
        return why

    def alive(self) -> bool:
        """This very process still runs (not a zombie, not a stranger with its pid)."""
        return self._verify() is None

    def signal(self, sig: signal.Signals) -> bool:
        """Send ``sig`` if this is still the recorded process; False if it is not."""
        fd, _ = self._open()
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
        """Block until the process ends (True) or ``timeout_s`` passes (False).

        Ended means every thread: right after a SIGKILL a JVM's main thread is a zombie
        while its other threads still hold its sockets, so a restart on the same port
        would find it taken. The pidfd turns readable only once all of them are gone."""
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            return True
            return True
        try:
            if _start_ticks(self.pid) != self.start_ticks:  # after opening: the fd pins it
                return True
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + timeout_s
            while not poller.poll(max(0.0, min(deadline - time.monotonic(), 0.5)) * 1000):
                if time.monotonic() >= deadline:
                    return False
            return True  # readable for a zombie too (a child of ours not yet reaped)
        finally:
            os.close(fd)

    def terminate(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; only ever to the recorded process."""
        if self.signal(signal.SIGTERM) and not self.wait_exit(grace_s):
            self.signal(signal.SIGKILL)
            self.wait_exit(10.0)


@dataclass(frozen=True)
class Check:
    """What a pid file says now: our live process, if any, and why the file is stale
    when it is (its pid is held by a process that is not ours, or cannot be verified)."""

    record: ProcessRecord | None = None
    stale: str | None = None

    @property
    def pid(self) -> int | None:
        return None if self.record is None else self.record.pid


class PidFile:
    """``{"pid", "start_ticks", "cmdline"}`` as JSON (``cmdline`` optional), recording the
    process ``what`` names (e.g. "the broker tally started")."""

    def __init__(self, path: Path, what: str = "the process tally started") -> None:
        if not hasattr(os, "pidfd_open") or not Path("/proc/self/stat").exists():
            raise EngineUnavailable("local engines and the development broker need Linux")
        self.path = path
        self.what = what

    def write(self, rec: ProcessRecord) -> None:
        doc: dict[str, object] = {"pid": rec.pid, "start_ticks": rec.start_ticks}
        if rec.cmdline is not None:
            doc["cmdline"] = list(rec.cmdline)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        tmp.replace(self.path)

    def record(self, pid: int) -> ProcessRecord:
        """Write who ``pid`` (a process just started) is; EngineError if it already exited."""
        rec = ProcessRecord.of(pid)
        if rec is None:
            raise EngineError(f"{self.what} (pid {pid}) exited as soon as it started")
        self.write(rec)
        return rec

    def check(self) -> Check:
        """The recorded process if it still runs and is ours; the file is left as it is."""
        try:
            rec = self._parse(self.path.read_text())
        except FileNotFoundError:
            return Check()
        except OSError as exc:
            return Check(stale=f"it cannot be read ({exc.strerror})")
        if isinstance(rec, str):
            return Check(stale=rec)
        if rec is None:
            return Check()
        why = rec._verify()
        if why is None:
            return Check(rec)
        if why == _GONE:
            return Check()
        return Check(stale=f"pid {rec.pid} is not {self.what} ({why})")

    def _parse(self, text: str) -> ProcessRecord | str | None:
        """The record in the file; None if it names a pid no process holds; else why it
        cannot be trusted."""
        try:
            doc = json.loads(text)
        except ValueError:
            return "it is unreadable"
        if isinstance(doc, int) and not isinstance(doc, bool) and doc > 0:
            # The development broker's old format: a bare pid, with nothing to verify it by.
            if _observe(doc) is None:
                return None
            return f"pid {doc} cannot be verified as {self.what} (an old-format file)"
        try:
            pid, ticks, args = int(doc["pid"]), int(doc["start_ticks"]), doc.get("cmdline")
            cmdline = None if args is None else tuple(str(a) for a in args)
        except (TypeError, KeyError, ValueError, AttributeError):
            return "it is unreadable"
        if pid <= 0:  # 0 and -1 would mean our own group, or everything
            return "it is unreadable"
        return ProcessRecord(pid, ticks, cmdline)

    def running(self) -> ProcessRecord | None:
        return self.check().record

    def tidy(self) -> Check:
        """``check``, removing a file that names no process of ours (saying why, if stale)."""
        found = self.check()
        if found.record is None:
            self.clear()
        return self._removed(found)

    def stop(self, grace_s: float) -> Check:
        """Terminate our process (see ``ProcessRecord.terminate``) and remove the file;
        returns what was found before stopping."""
        found = self.check()
        if found.record is not None:
            found.record.terminate(grace_s)
        self.clear()
        return self._removed(found)

    def _removed(self, found: Check) -> Check:
        if found.stale is None:
            return found
        note = f"stale pid file {self.path} removed: {found.stale}; it was not signalled"
        return Check(stale=note)

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
