"""Resolve an engine's pinned pom into a directory of jars, once per pom content.

The cache key is a hash of the pom, so a version bump in the repository resolves
again on the next ``up`` while an unchanged pom never calls Maven (nor needs it).
Maven's own repository sits inside the cache too: deleting ``TALLY_ENGINES_HOME``
forgets everything. A file lock makes concurrent ``up`` calls resolve once.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from engines.base import file_lock, java_binary
from tally.errors import EngineUnavailable

POMS = Path(__file__).parent / "poms"
# Pinned so that Maven 3.8's old default plugin is not what copies the jars.
_GOAL = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def pom_path(engine: str) -> Path:
    return POMS / engine / "pom.xml"


def pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()[:16]


def _first_error(output: str) -> str:
    lines = [_ANSI.sub("", line).strip() for line in output.splitlines()]
    errors = [ln.removeprefix("[ERROR]").strip() for ln in lines if ln.startswith("[ERROR]")]
    picked = next((e for e in errors if e), None) or next((ln for ln in lines if ln), "")
    return picked[:400]


def resolve(engine: str, home: Path, pom: Path | None = None) -> Path:
    """The directory holding every runtime jar of ``pom`` (default: the engine's own)."""
    pom = pom or pom_path(engine)
    root = home / engine / pom_digest(pom)
    lib = root / "lib"
    done = root / "resolved"
    if done.exists():
        return lib
    with file_lock(home / engine / ".lock"):
        if done.exists():  # another process resolved it while we waited
            return lib
        java_binary()  # Maven needs it too, and says so less clearly
        mvn = shutil.which("mvn")
        if mvn is None:
            raise EngineUnavailable(
                f"mvn (Apache Maven) not found on PATH: needed once to fetch {engine}'s"
                f" artifacts into {home}"
            )
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pom, root / "pom.xml")  # the installed package may be read-only
        partial = root / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = [
            mvn,
            "-B",
            "-q",
            "-ntp",
            "-Dstyle.color=never",
            "-f",
            str(root / "pom.xml"),
            f"-Dmaven.repo.local={home / 'm2'}",
            _GOAL,
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
        ]
        try:
            ran = subprocess.run(
                cmd, cwd=root, capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineUnavailable(
                f"maven did not resolve {engine}'s artifacts within 900s"
            ) from exc
        if ran.returncode != 0 or not any(partial.glob("*.jar")):
            raise EngineUnavailable(
                f"maven could not resolve {engine}'s artifacts ({pom}):"
                f" {_first_error(ran.stdout + ran.stderr) or f'exit {ran.returncode}'}"
            )
        shutil.rmtree(lib, ignore_errors=True)
        partial.replace(lib)
        done.write_text("\n".join(sorted(p.name for p in lib.glob("*.jar"))) + "\n")
    return lib
