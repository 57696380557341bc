"""``tally druid``: without a reachable Druid one line saying so (exit 2); on the real
Druid the supervisors' lifecycle — status, suspend, resume, reset — as Druid reports
it: the base datasource's and each rollup's, reset for the base alone (a rollup's
deltas read twice would be summed twice)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from ingest.kafka import ensure_topics
from storage.druid.overlord import Overlord
from storage.druid.supervisor import datasource_name, supervisors
from tally.specs import SpecRegistry
from tests.brokers import KafkaBroker
from tests.cli import tally
from tests.conftest import broker_settings
from tests.druid import Druid, poll
from tests.ingest.conftest import env_for
from tests.storage.druid.conftest import druid_settings


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


def test_suspend_resume_and_reset_the_supervisor_on_a_real_druid(
    druid: Druid, kafka_broker: KafkaBroker, data_dir: Path, registry: SpecRegistry
) -> None:
    settings = druid_settings(druid, data_dir, broker_settings(kafka_broker, data_dir))
    ensure_topics(settings, registry)
    env = env_for(settings)
    spec = registry.get("payments")
    name = datasource_name(settings, spec)
    names = list(supervisors(settings, spec))
    assert names[0] == name and len(names) == 1 + len(spec.rollups)
    overlord = Overlord(settings)

    def states() -> dict[str, Any]:
        ran = tally("druid", "status", "--format", "json", env=env)
        assert ran.code == 0, ran.err
        rows = ran.json()["supervisors"]
        assert [r["supervisor"] for r in rows] == names
        return {r["supervisor"]: r["state"] for r in rows}

    def reaches(state: str, which: list[str] = names) -> None:
        poll(
            lambda: all(states()[n] == state for n in which) or None,
            120,
            f"{which} never {state}",
        )

    assert set(states().values()) == {"absent"}
    missing = tally("druid", "suspend", env=env)
    assert missing.code != 0 and len(missing.err.strip().splitlines()) == 1, missing.err
    assert "tally druid apply" in missing.err
    try:
        assert tally("druid", "apply", env=env).code == 0
        reaches("RUNNING")
        for action, state in (("suspend", "SUSPENDED"), ("resume", "RUNNING")):
            ran = tally("druid", action, "--datasource", "payments", "--format", "json", env=env)
            assert ran.code == 0, ran.err
            assert ran.json() == {
                "supervisors": [{"supervisor": n, "result": action} for n in names]
            }
            reaches(state)
            assert all(overlord.status(n)["state"] == state for n in names)  # type: ignore[index]
        unconfirmed = tally("druid", "reset", env=env)
        assert unconfirmed.code != 0 and "--yes" in unconfirmed.err
        assert len(unconfirmed.err.strip().splitlines()) == 1
        reset = tally("druid", "reset", "--yes", "--format", "json", env=env)
        assert reset.code == 0, reset.err
        assert reset.json() == {"supervisors": [{"supervisor": name, "result": "reset"}]}
        reaches("RUNNING")
    finally:
        druid.drop(*names)
