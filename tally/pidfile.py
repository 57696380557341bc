"""A process Tally started, recorded in a pid file, verified before it is signalled.

A bare pid names whatever process holds that number *now*: once the process we
started is gone (a crash, a reboot) the kernel hands its pid to something else, and
signalling that pid's process group would hit a process Tally never started. So the
file records who the process was — its start time (``/proc/<pid>/stat`` field 22,
clock ticks since boot; ``ps -o lstart`` where there is no /proc) and its command
line — and a pid whose identity no longer matches is *stale*: reported, its file
removed, never signalled. A pid we may not signal (``PermissionError``) is alive but
not ours: stale too. A pid file in the old format (a bare integer) cannot be
verified, so it is stale as well.

Shared by every process Tally stops by pid (the development broker today, the
engines' JVMs later), hence it depends on nothing but the standard library and
``tally.errors``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tally.errors import TallyError

_PROC = Path("/proc")


class Unverifiable(TallyError):
    """Neither /proc nor ps can tell who a pid is: nothing may be signalled."""


@dataclass(frozen=True)
class Identity:
    """Who a process is, beyond its reusable pid (comparable on one machine only)."""

    started: str
    cmdline: tuple[str, ...]


def _from_proc(pid: int) -> Identity | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself hold ") ".
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[k] is field k + 3
    if fields[0] in ("Z", "X"):  # exited, only waiting to be reaped
        return None
    args = tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])
    return Identity(f"proc:{fields[19]}", args)


def _from_ps(pid: int) -> Identity | None:
    try:
        out = subprocess.run(
            ["ps", "-ww", "-o", "stat=", "-o", "lstart=", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        ).stdout.strip()
    except FileNotFoundError as exc:
        raise Unverifiable(f"cannot verify pid {pid}: no /proc and no ps") from exc
    parts = out.split(None, 6)  # stat, lstart as "Mon Jan 1 00:00:00 2024", command
    if len(parts) < 6 or parts[0].startswith("Z"):
        return None
    return Identity("ps:" + " ".join(parts[1:6]), tuple(parts[6:]))


def identity(pid: int) -> Identity | None:
    """The identity of live process ``pid``; None when there is none (or a zombie)."""
    return _from_proc(pid) if (_PROC / "self" / "stat").exists() else _from_ps(pid)


@dataclass(frozen=True)
class Check:
    """What a pid file says now: the verified pid of our live process, if any, and
    why the file was stale when it was (the file has then been removed)."""

    pid: int | None = None
    stale: str | None = None


class PidFile:
    """``path`` records the process ``what`` names (e.g. "the broker tally started")."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what

    def record(self, pid: int) -> None:
        """Remember ``pid`` (a process just started) together with its identity."""
        ident = identity(pid)
        if ident is None:
            raise TallyError(f"{self.what} (pid {pid}) exited as soon as it started")
        doc = {"pid": pid, "started": ident.started, "cmdline": list(ident.cmdline)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        os.replace(tmp, self.path)

    def check(self) -> Check:
        """The recorded process if it is still ours; a stale or dead record is removed."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Check()
        pid, reason = self._verify(text)
        if reason is None and pid is not None:
            return Check(pid)
        self.path.unlink(missing_ok=True)
        if reason is None:  # it simply is not running any more
            return Check()
        return Check(stale=f"stale pid file {self.path} removed: {reason}; it was not signalled")

    def _verify(self, text: str) -> tuple[int | None, str | None]:
        """(pid, None) if ours and alive, (None, None) if gone, (pid?, reason) if stale."""
        try:
            doc = json.loads(text)
        except ValueError:
            return None, "it is unreadable"
        if isinstance(doc, int) and not isinstance(doc, bool):
            # The old format: a bare pid, with nothing to verify it by.
            if not _alive(doc):
                return None, None
            return doc, f"pid {doc} cannot be verified as {self.what} (an old-format file)"
        try:
            pid = int(doc["pid"])
            want = Identity(str(doc["started"]), tuple(str(a) for a in doc["cmdline"]))
        except (TypeError, KeyError, ValueError):
            return None, "it is unreadable"
        if pid <= 0:  # 0 and -1 would signal our own group, or everything
            return None, "it is unreadable"
        not_ours = f"pid {pid} is not {self.what}"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None, None
        except PermissionError:
            return pid, f"{not_ours} (it belongs to another user)"
        try:
            have = identity(pid)
        except Unverifiable as exc:
            return pid, exc.message
        if have is None:
            return None, None
        if have.started != want.started:
            return pid, f"{not_ours} (its start time differs)"
        if have.cmdline != want.cmdline:
            return pid, f"{not_ours} (its command line differs)"
        return pid, None

    def stop(self, timeout_s: float = 10.0) -> Check:
        """SIGTERM our process's group, SIGKILL it after ``timeout_s``; remove the file.

        Returns what was found before stopping (its ``stale`` note, if any)."""
        found = self.check()
        if found.pid is not None:
            self._signal(found.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.check().pid is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if (still := self.check().pid) is not None:
                self._signal(still, signal.SIGKILL)
        self.path.unlink(missing_ok=True)
        return found

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        """Signal ``pid``'s process group when it leads one (as started with
        ``start_new_session``), else just the process."""
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
