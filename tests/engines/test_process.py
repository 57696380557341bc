"""``engines.process`` against real processes: a pid is signalled only when the process
holding it is the one we started (same start time and, where recorded, command line)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.base import port_taken
from engines.process import Check, PidFile, ProcessRecord
from tally.errors import TallyError
from tests.cli import tally


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that has nothing to do with Tally."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(10)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours, leading its own process group as the engines' do."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


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


def test_a_record_is_alive_only_with_its_own_command_line_where_recorded(
    stranger: subprocess.Popen[bytes],
) -> None:
    rec = ProcessRecord.of(stranger.pid)
    assert rec is not None and rec.cmdline == ("sleep", "300")
    assert not ProcessRecord(stranger.pid, rec.start_ticks, ("sleep", "301")).alive()
    assert not ProcessRecord(stranger.pid, rec.start_ticks, ()).alive()
    assert ProcessRecord(stranger.pid, rec.start_ticks).alive()  # not recorded: not compared


def test_unreadable_pid_files_read_as_no_process(tmp_path: Path) -> None:
    for text in ["", "{not json", '{"pid": "x", "start_ticks": 1}', "[1, 2]", '"7"', "true"]:
        (tmp_path / "e.pid").write_text(text)
        found = PidFile(tmp_path / "e.pid").check()
        assert (found.record, found.stale) == (None, "it is unreadable"), text
    for pid in (0, -1):  # would signal our own process group, or every process
        (tmp_path / "e.pid").write_text(f'{{"pid": {pid}, "start_ticks": 1}}')
        assert PidFile(tmp_path / "e.pid").check().stale == "it is unreadable", pid


def test_an_old_format_pid_file_is_never_ours(
    tmp_path: Path, stranger: subprocess.Popen[bytes]
) -> None:
    """A bare pid (the development broker's old format) cannot be verified: stale if
    something holds that pid, simply gone if nothing does."""
    pids = PidFile(tmp_path / "e.pid", "the sleeper")
    pids.path.write_text(f"{stranger.pid}\n")
    found = pids.check()
    assert found.record is None
    assert (
        found.stale == f"pid {stranger.pid} cannot be verified as the sleeper (an old-format file)"
    )
    stranger.kill()
    stranger.wait(10)
    assert pids.check() == pids.tidy() == Check()
    assert not pids.path.exists()


def test_record_check_stop_round_trip(sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    pids = PidFile(tmp_path / "p" / "x.pid", "the sleeper")
    pids.record(sleeper.pid)
    assert pids.check().pid == sleeper.pid and pids.check().stale is None
    assert pids.tidy().pid == sleeper.pid and pids.path.exists()

    found = pids.stop(grace_s=10.0)

    assert found.pid == sleeper.pid
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert not pids.path.exists()
    assert pids.check().pid is None


def test_records_tell_processes_apart_and_see_zombies_as_gone(
    sleeper: subprocess.Popen[bytes],
) -> None:
    other = subprocess.Popen(["sleep", "61"])
    try:
        mine, theirs = ProcessRecord.of(sleeper.pid), ProcessRecord.of(other.pid)
        assert mine is not None and theirs is not None
        assert mine == ProcessRecord.of(sleeper.pid)
        assert mine.cmdline != theirs.cmdline
        assert "sleep" in " ".join(mine.cmdline or ())

        os.kill(other.pid, signal.SIGKILL)
        os.waitid(os.P_PID, other.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        assert ProcessRecord.of(other.pid) is None
        assert not theirs.alive()
        assert not theirs.signal(signal.SIGTERM)
        assert theirs.wait_exit(0.0)
    finally:
        other.kill()
        other.wait()


def test_a_record_taken_as_soon_as_popen_returns_has_the_command_line() -> None:
    """Popen returns before exec has finished (the command line then reads empty, a few
    times in a hundred): a record taken then would never match its own process again."""
    for n in range(1000):
        proc = subprocess.Popen(["sleep", "30", str(n)])
        try:
            rec = ProcessRecord.of(proc.pid)
            assert rec is not None and rec.cmdline == ("sleep", "30", str(n))
            assert rec.alive()
        finally:
            proc.kill()
            proc.wait()


def test_a_process_that_exits_at_once_cannot_be_recorded(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    try:
        with pytest.raises(TallyError, match="exited as soon as it started"):
            PidFile(tmp_path / "x.pid", "true").record(proc.pid)
    finally:
        proc.wait()
    assert not (tmp_path / "x.pid").exists()


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


# The main thread leaves (pthread_exit) while another thread keeps the process, and its
# socket, alive: /proc shows the leader as a zombie, as right after a SIGKILLed JVM.
_LEADER_LEAVES_FIRST = """
import ctypes, socket, sys, threading, time
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
print(listener.getsockname()[1], flush=True)
sys.stdin.readline()  # the parent has recorded this process: the leader may leave
threading.Thread(target=time.sleep, args=(300,)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_has_exited_only_when_its_last_thread_has(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LEADER_LEAVES_FIRST],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        # Recorded before its leader leaves: a zombie leader is no live process to
        # record (a loaded CI machine once let the child get there first).
        rec = ProcessRecord.of(proc.pid)
        assert rec is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while rec.alive() and time.monotonic() < deadline:  # until the leader is a zombie
            time.sleep(0.01)
        assert not rec.alive(), "the leader thread did not leave"
        assert port_taken(port), "the remaining thread still holds the socket"
        assert not rec.wait_exit(0.5), "a process whose threads still run has not exited"
        os.kill(proc.pid, signal.SIGKILL)
        assert rec.wait_exit(10)
        assert not port_taken(port), "once exited, its port is free for a restart"
    finally:
        proc.kill()
        proc.wait(10)
