"""``tally druid apply`` without a reachable Druid: one line saying so, exit 2."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.cli import tally


def test_apply_with_druid_unreachable_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ran = tally(
        "druid",
        "apply",
        data_dir=tmp_path,
        env={"TALLY_STORE__BACKEND": "druid", "TALLY_DRUID__OVERLORD_URL": closed},
    )
    assert ran.code == 2, (ran.out, ran.err)
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and closed in lines[0], ran.err
    assert ran.out == ""
