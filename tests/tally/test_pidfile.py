"""``tally.pidfile`` against real processes: what counts as the process we started."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tally.errors import TallyError
from tally.pidfile import PidFile, _from_proc, _from_ps, identity


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_record_check_stop_round_trip(sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    pids = PidFile(tmp_path / "p" / "x.pid", "the sleeper")
    pids.record(sleeper.pid)
    assert pids.check().pid == sleeper.pid and pids.check().stale is None

    found = pids.stop()

    assert found.pid == sleeper.pid
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert not pids.path.exists()
    assert pids.check().pid is None


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_both_readers_tell_processes_apart_and_see_zombies_as_gone(
    sleeper: subprocess.Popen[bytes],
) -> None:
    other = subprocess.Popen(["sleep", "61"])
    try:
        for read in (_from_proc, _from_ps):
            mine, theirs = read(sleeper.pid), read(other.pid)
            assert mine is not None and theirs is not None
            assert mine == read(sleeper.pid)
            assert mine.cmdline != theirs.cmdline
            assert "sleep" in " ".join(mine.cmdline)
        assert identity(sleeper.pid) == _from_proc(sleeper.pid)

        os.kill(other.pid, signal.SIGKILL)
        os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        assert (_from_proc(other.pid), _from_ps(other.pid)) == (None, None)
    finally:
        other.kill()
        other.wait()


def test_a_process_that_exits_at_once_cannot_be_recorded(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    try:
        with pytest.raises(TallyError, match="exited as soon as it started"):
            PidFile(tmp_path / "x.pid", "true").record(proc.pid)
    finally:
        proc.wait()
    assert not (tmp_path / "x.pid").exists()
