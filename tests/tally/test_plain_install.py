"""A plain install runs: the wheel, installed into a fresh venv without extras, runs
``tally --help`` and ``tally demo --format json`` to its ready line.

Every runtime import must be a declared runtime dependency; the dev tools (pytest,
hypothesis, mysql-mimic, ...) are not there. An undeclared import fails this test.

Built and installed with uv (a dev dependency): the same wheel and the same resolution
from PyPI as pip's, in seconds instead of most of a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ingest.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = ("mysql_mimic", "pytest", "hypothesis", "schemathesis", "osmem_server")


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_the_wheel_installed_without_extras_runs_help_and_the_demo(tmp_path: Path) -> None:
    uv = str(Path(sys.executable).parent / "uv")
    wheels = tmp_path / "wheels"
    built = _run([uv, "build", "--wheel", "--quiet", "--out-dir", str(wheels), str(ROOT)])
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("tally-*.whl")
    env_dir = tmp_path / "venv"
    made = _run([uv, "venv", "--quiet", "--python", sys.executable, str(env_dir)])
    assert made.returncode == 0, made.stderr
    python = env_dir / "bin" / "python"
    installed = _run([uv, "pip", "install", "--quiet", "--python", str(python), str(wheel)])
    assert installed.returncode == 0, installed.stderr
    missing = _run(
        [
            str(python),
            "-c",
            f"import importlib.util as u; print([m for m in {DEV_ONLY!r} if u.find_spec(m)])",
        ]
    )
    assert missing.stdout.strip() == "[]", "the fresh venv must hold no dev tool"

    tally = env_dir / "bin" / "tally"
    helped = _run([str(tally), "--help"], cwd=tmp_path)
    assert helped.returncode == 0 and "demo" in helped.stdout, helped.stderr

    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TALLY_DATA_DIR": str(tmp_path / "demo"),
        "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
    }
    errors = tmp_path / "demo.err"  # a file: a pipe nobody reads would fill and block it
    demo = subprocess.Popen(
        [str(tally), "demo", "--rate", "200", "--format", "json", "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors.open("w"),
        text=True,
        start_new_session=True,  # its broker and API server die with it, whatever happens
    )
    try:
        assert demo.stdout is not None
        line = demo.stdout.readline()
        assert line, errors.read_text()[-3000:] or "no ready line"
        assert set(json.loads(line)) == {"url", "api_key"}
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=90)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, f"exit {code} after SIGINT: {errors.read_text()[-3000:]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        demo.wait()
