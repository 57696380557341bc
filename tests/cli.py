"""Run the real ``tally`` command in a subprocess, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def tally(
    *args: str,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Ran:
    full_env = {**os.environ, **(env or {})}
    if data_dir is not None:
        full_env["TALLY_DATA_DIR"] = str(data_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "tally", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr)
