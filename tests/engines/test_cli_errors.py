"""What ``tally engines`` says when it cannot work: one line, exit code 2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from engines import maven
from engines.base import engines_home
from tally.errors import EngineUnavailable
from tests.brokers import not_available
from tests.cli import Ran, tally


def one_error_line(ran: Ran) -> str:
    assert ran.code == 2, (ran.code, ran.err)
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.err
    assert "Traceback" not in ran.err
    return lines[0]


def bare_env(tmp_path: Path, *tools: str) -> dict[str, str]:
    """A PATH holding only ``tools`` and an empty artifact cache."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not on PATH")
        (bin_dir / tool).symlink_to(os.path.realpath(found))
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    return env | {"PATH": str(bin_dir), "TALLY_ENGINES_HOME": str(tmp_path / "cache")}


def test_missing_maven_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = bare_env(tmp_path, "java")
    line = one_error_line(tally("engines", "up", "kafka", data_dir=tmp_path / "d", env=env))
    assert "mvn" in line and "PATH" in line
    assert not (tmp_path / "d" / "engines" / "kafka" / "kafka.pid").exists()


def test_missing_java_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = bare_env(tmp_path)
    line = one_error_line(tally("engines", "up", "kafka", data_dir=tmp_path / "d", env=env))
    assert "java" in line


def test_an_unknown_engine_is_one_line_and_exit_2(tmp_path: Path) -> None:
    line = one_error_line(tally("engines", "up", "kafka", "nosuch", data_dir=tmp_path))
    assert "'nosuch'" in line and "kafka" in line
    # Validated before anything starts: kafka was not started for the valid half.
    assert not (tmp_path / "engines" / "kafka").exists()


def test_an_artifact_maven_cannot_resolve_is_one_line(tmp_path: Path) -> None:
    if shutil.which("mvn") is None or shutil.which("java") is None:
        not_available("mvn or java is not on PATH")
    pom = tmp_path / "pom.xml"
    pom.write_text(
        maven.pom_path("kafka").read_text().replace("<version>4.", "<version>0.0.0-no-such-4.", 1)
    )
    home = engines_home()  # the shared cache: Maven's plugins are already there
    try:
        with pytest.raises(EngineUnavailable) as caught:
            maven.resolve("unresolvable-test", home, pom)
    finally:
        shutil.rmtree(home / "unresolvable-test", ignore_errors=True)
    message = caught.value.message
    assert "\n" not in message
    assert "could not resolve" in message and "0.0.0-no-such-4" in message, message


def test_a_changed_pom_is_resolved_again(tmp_path: Path) -> None:
    pom = tmp_path / "pom.xml"
    original = maven.pom_path("kafka").read_text()
    pom.write_text(original)
    same = maven.pom_digest(pom)
    assert same == maven.pom_digest(maven.pom_path("kafka"))
    pom.write_text(original.replace("4.4.0", "4.3.1"))
    assert maven.pom_digest(pom) != same
