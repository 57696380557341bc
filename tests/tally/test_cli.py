"""The ``tally`` command: help everywhere, one JSON document, one-line failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.embedded.store import EmbeddedStore
from tests.cli import tally
from tests.factories import payment

COMMANDS = [(), ("sql",), ("rollups",), ("rollups", "status"), ("rollups", "rebuild")]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_everywhere(command: tuple[str, ...]) -> None:
    ran = tally(*command, "--help")
    assert ran.code == 0, ran.err
    assert ran.out.startswith("Usage: tally")


def test_sql_json_has_the_documented_shape(store: EmbeddedStore, data_dir: Path) -> None:
    store.commit("payments", [payment("a", merchant_id="m1"), payment("b", merchant_id="m2")])
    ran = tally(
        "sql",
        "SELECT merchant_id, count(*) AS n FROM payments GROUP BY 1 ORDER BY 1",
        "--format",
        "json",
        data_dir=data_dir,
    )
    assert ran.code == 0, ran.err
    assert ran.json() == {"columns": ["merchant_id", "n"], "rows": [["m1", 1], ["m2", 1]]}
    raw = tally("sql", "SELECT count(*) FROM raw.payments", data_dir=data_dir)
    assert raw.code == 0 and "(1 row)" in raw.out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("sql", "SELEC nonsense"), 1, "syntax error"),
        (("sql", "SELECT * FROM missing_table"), 1, "missing_table"),
        (("sql", "SELECT 1", "--format", "yaml"), 2, "--format"),
        (("rollups", "rebuild", "--partition", "2026-13-01"), 1, "YYYY-MM-DD"),
        (("rollups", "rebuild", "--datasource", "refunds"), 1, "unknown datasource 'refunds'"),
        (("--bogus",), 2, "No such option"),
    ],
)
def test_failures_are_one_line_with_a_reason(
    data_dir: Path, args: tuple[str, ...], code: int, needle: str
) -> None:
    ran = tally(*args, data_dir=data_dir)
    assert ran.code == code
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1, ran.err
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in ran.err


def test_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "tally.toml"
    config.write_text("[store]\nbusy_timeout_s = 0\n")
    ran = tally("--config", str(config), "sql", "SELECT 1")
    assert ran.code == 1
    assert ran.err.startswith(f"error: {config}: store.busy_timeout_s")
