"""Engine processes are signalled by pid only when the start time matches too."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.process import PidFile, ProcessRecord
from tests.cli import tally


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that has nothing to do with Tally."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(10)


def test_a_record_is_alive_only_with_its_own_start_time(
    stranger: subprocess.Popen[bytes],
) -> None:
    rec = ProcessRecord.of(stranger.pid)
    assert rec is not None and rec.alive()
    assert not ProcessRecord(stranger.pid, rec.start_ticks + 1).alive()
    stranger.kill()
    stranger.wait(10)
    assert not rec.alive()
    assert not rec.signal(signal.SIGTERM)


def test_unreadable_pid_files_read_as_no_process(tmp_path: Path) -> None:
    for text in ["", "12345", "{not json", '{"pid": "x", "start_ticks": 1}', "[1, 2]"]:
        (tmp_path / "e.pid").write_text(text)
        assert PidFile(tmp_path / "e.pid").read() is None, text


def test_a_stale_pid_file_pointing_at_a_live_stranger_is_never_signalled(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    rec = ProcessRecord.of(stranger.pid)
    assert rec is not None
    engine_dir = tmp_path / "engines" / "kafka"
    engine_dir.mkdir(parents=True)
    # As after a reboot: the recorded pid now belongs to someone else, who started later.
    PidFile(engine_dir / "kafka.pid").write(ProcessRecord(stranger.pid, rec.start_ticks - 1))

    status = tally("engines", "status", "--format", "json", data_dir=tmp_path)
    assert status.code == 0, status.err
    assert status.json()["engines"]["kafka"]["running"] is False
    assert status.json()["engines"]["kafka"]["pid"] is None

    down = tally("engines", "down", "kafka", "--format", "json", data_dir=tmp_path)
    assert down.code == 0, down.err
    assert stranger.poll() is None, "down signalled a process it did not start"
    os.kill(stranger.pid, 0)
    assert not (engine_dir / "kafka.pid").exists()  # the stale record is forgotten
