"""``tally broker down|status`` never signal a process they did not start: a pid file
whose pid now names another process (recycled, or from an old-format file that cannot
be verified) is reported on one line, removed, and its process left alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines.process import PidFile, ProcessRecord
from tests.cli import Ran, tally
from tests.ingest.conftest import free_port


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A live process Tally did not start, leading its own process group (so that
    code which wrongly signals the group hits only this process)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def foreign() -> Iterator[tuple[int, list[str]]]:
    """A live process of another user, and the prefix that runs tally unable to signal it
    (as root: a ``sleep`` run as nobody, and tally without CAP_KILL)."""
    if os.geteuid() != 0:
        if os.stat("/proc/1").st_uid == os.geteuid():
            pytest.skip("every process here is ours")
        yield 1, []
        return
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_KILL")
    proc = subprocess.Popen(["sleep", "60"], user=65534, start_new_session=True)
    yield proc.pid, ["setpriv", "--bounding-set=-kill", "--"]
    proc.kill()
    proc.wait()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"TALLY_DATA_DIR": str(tmp_path), "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}


def _pid_file(env: dict[str, str]) -> Path:
    path = Path(env["TALLY_DATA_DIR"]) / "broker" / "tansu.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _warned(ran: Ran, pid: int) -> str:
    """The command succeeded, saying once on stderr which stale pid it left alone."""
    assert ran.code == 0, ran.err
    assert "Traceback" not in ran.err, ran.err
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: stale pid file"), ran.err
    assert f"pid {pid} " in lines[0] and "not signalled" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["down", "status"])
def test_an_old_format_pid_file_naming_an_unrelated_process_is_not_signalled(
    bystander: subprocess.Popen[bytes], env: dict[str, str], command: str
) -> None:
    pid_file = _pid_file(env)
    pid_file.write_text(f"{bystander.pid}\n")

    ran = tally("broker", command, "--format", "json", env=env)

    assert bystander.poll() is None, "a process tally did not start was signalled"
    assert "old-format" in _warned(ran, bystander.pid)
    assert not pid_file.exists()
    assert (ran.json()["running"], ran.json()["pid"]) == (False, None)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("start_ticks", 1, "start time differs"),  # the pid was recycled
        ("cmdline", ["/usr/bin/tansu", "broker"], "command line differs"),
    ],
)
def test_a_pid_whose_recorded_identity_differs_is_not_signalled(
    bystander: subprocess.Popen[bytes],
    env: dict[str, str],
    field: str,
    value: object,
    reason: str,
) -> None:
    pid_file = _pid_file(env)
    PidFile(pid_file, "x").record(bystander.pid)
    record = json.loads(pid_file.read_text())
    assert record[field] != value
    pid_file.write_text(json.dumps({**record, field: value}))

    ran = tally("broker", "down", "--format", "json", env=env)

    assert bystander.poll() is None, "a process tally did not start was signalled"
    assert reason in _warned(ran, bystander.pid)
    assert not pid_file.exists()


def test_a_pid_whose_recorded_identity_matches_is_stopped(
    bystander: subprocess.Popen[bytes], env: dict[str, str]
) -> None:
    """The control for the test above: the same record, unaltered, is ours."""
    pid_file = _pid_file(env)
    PidFile(pid_file, "x").record(bystander.pid)

    ran = tally("broker", "down", "--format", "json", env=env)

    assert ran.code == 0 and ran.err == "", ran.err
    assert bystander.wait(timeout=10) == -signal.SIGTERM
    assert not pid_file.exists()


def test_a_pid_of_another_user_is_not_ours(
    foreign: tuple[int, list[str]], env: dict[str, str]
) -> None:
    """Alive with the recorded identity, but not ours to signal (PermissionError)."""
    pid, prefix = foreign
    pid_file = _pid_file(env)
    PidFile(pid_file, "x").record(pid)

    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "tally", "broker", "down", "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )

    ran = Ran(proc.returncode, proc.stdout, proc.stderr)
    assert "belongs to another user" in _warned(ran, pid)
    assert ProcessRecord.of(pid) is not None, "a process tally did not start was signalled"
    assert not pid_file.exists()
    assert (ran.json()["running"], ran.json()["pid"]) == (False, None)
