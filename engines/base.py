"""What every local engine implements, and the steps they all share.

An engine is a real server (a JVM from Maven Central, say) that Tally runs as a process
on loopback for development and tests. Its artifacts are cached per machine under
``TALLY_ENGINES_HOME``; its configuration, data, pid file and log live per data dir
under ``<data dir>/engines/<name>/``, so two checkouts never share a broker by accident.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from engines.process import PidFile, ProcessRecord
from tally.errors import EngineError, EngineUnavailable


def engines_home() -> Path:
    """The per-machine artifact cache (``TALLY_ENGINES_HOME``, default ~/.cache/tally/engines)."""
    home = os.environ.get("TALLY_ENGINES_HOME")
    return Path(home) if home else Path.home() / ".cache" / "tally" / "engines"


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` if set, else ``java`` from PATH, else EngineUnavailable."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home) / "bin" / "java", os.X_OK):
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise EngineUnavailable("java not found on PATH (the local engines need Java 17+)")
    return found


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def free_loopback_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (held together while chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_taken(port: int) -> bool:
    """Whether something else holds 127.0.0.1:port (a TIME_WAIT leftover does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


class Engine(ABC):
    """One engine: ``resolve`` → ``start`` → ``ready``, ``stop``, ``status``, ``env``.

    Subclasses say how to fetch, configure, launch and probe their server; this class
    owns the pid file, the per-data-dir lock and the order of the steps in ``up``.
    """

    name: ClassVar[str]
    start_timeout_s: ClassVar[float] = 120.0
    stop_grace_s: ClassVar[float] = 30.0

    def __init__(self, data_dir: Path, home: Path | None = None) -> None:
        self.home = home if home is not None else engines_home()
        self.dir = data_dir / "engines" / self.name
        self.pid_file = PidFile(self.dir / f"{self.name}.pid")
        self.log = self.dir / f"{self.name}.log"
        self.state_file = self.dir / "state.json"

    # -- what each engine provides ------------------------------------------------------

    @abstractmethod
    def resolve(self) -> Path:
        """Fetch the pinned artifacts into the cache (once per pin); returns where they are."""

    @abstractmethod
    def start(self, artifacts: Path) -> ProcessRecord:
        """Configure (first time: choose ports, format storage) and launch; do not wait."""

    @abstractmethod
    def answers(self, timeout_s: float) -> bool:
        """One real protocol round trip to this engine (not merely an open port)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Engine-specific status fields (addresses, version...)."""

    @abstractmethod
    def env(self) -> dict[str, str]:
        """The ``TALLY_*`` settings a Tally process needs to use this engine (once started)."""

    # -- shared ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What must survive restarts (ports, cluster ids); {} before the first start."""
        try:
            doc = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def save_state(self, doc: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    def require_free(self, ports: dict[str, Any]) -> None:
        """EngineError naming the first of ``ports`` (role → port, kept from the first
        start) that another process holds: the engine comes back on its own ports."""
        for role, port in ports.items():
            if port_taken(int(port)):
                raise EngineError(
                    f"{self.name}'s {role} port 127.0.0.1:{port} (kept from its first start)"
                    " is held by another process"
                )

    def running(self) -> ProcessRecord | None:
        return self.pid_file.running()

    def launch(self, artifacts: Path) -> bool:
        """Start the engine if it is not running (``start``, then its pid file); True if
        it was started. An engine of several processes starts those that are not."""
        if self.running() is not None:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid_file.write(self.start(artifacts))
        return True

    def exited(self) -> str | None:
        """Why the engine can no longer become ready (its process exited), or None."""
        if self.running() is None:
            return f"{self.name} exited during start-up (log {self.log}): {log_tail(self.log)}"
        return None

    def pending(self) -> str:
        """Where to look when the engine does not answer in time."""
        return f"log {self.log}"

    def ready(self, deadline: float) -> None:
        """Wait until the engine answers, or raise EngineError (with its log's last lines)."""
        while True:
            why = self.exited()
            if why is not None:
                raise EngineError(why)
            left = deadline - time.monotonic()
            if left <= 0:
                within = f"{self.start_timeout_s:g}s"
                raise EngineError(f"{self.name} did not answer within {within} ({self.pending()})")
            if self.answers(min(left, 2.0)):
                return

    def up(self) -> dict[str, Any]:
        """Leave the engine running and answering: start it (again, same ports and data) if
        it is not running. Safe to call from several processes at once."""
        java_binary()
        artifacts = self.resolve()
        with file_lock(self.dir / ".lock"):
            started = self.launch(artifacts)
            try:
                self.ready(time.monotonic() + self.start_timeout_s)
            except EngineError:
                if started:
                    self._stop_locked()
                raise
        return self.status()

    def stop(self) -> dict[str, Any]:
        """Stop the recorded process (verified by start time and command line); data and ports
        are kept."""
        with file_lock(self.dir / ".lock"):
            self._stop_locked()
        return self.status()

    def _stop_locked(self) -> None:
        self.pid_file.stop(self.stop_grace_s)

    def status(self) -> dict[str, Any]:
        rec = self.running()
        return {
            "pid": rec.pid if rec is not None else None,
            "running": rec is not None,
            **self.describe(),
            "log": str(self.log),
            "data": str(self.dir),
        }
