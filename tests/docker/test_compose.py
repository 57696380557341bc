"""docker/compose.yaml, checked without Docker (no engine runs on this machine): its
Tally commands are ones the CLI accepts, its settings are real, its services fit
together. The second half breaks a copy on purpose and shows each check catches it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.docker.checks import (
    DRUID_OVERRIDE,
    STARROCKS_OVERRIDE,
    command_problems,
    compose_problems,
    dockerfile_problems,
    dockerignore_problems,
    druid_problems,
    environment,
    kafka_version_problem,
    load_compose,
    merged,
    parse_problem,
    settings_problem,
    starrocks_problems,
    tally_services,
    unknown_settings,
)

COMPOSE = load_compose()
TALLY = tally_services(COMPOSE)


def test_every_expected_service_is_a_tally_service_or_kafka() -> None:
    assert set(TALLY) == {"topics", "ingest-olap", "ingest-search", "watcher", "api"}
    assert compose_problems(COMPOSE) == []


@pytest.mark.parametrize("name", sorted(TALLY))
def test_command_is_one_the_cli_accepts(name: str, tmp_path: Path) -> None:
    service = TALLY[name]
    assert command_problems(service["command"], environment(service), tmp_path) == []


@pytest.mark.parametrize("name", sorted(TALLY))
def test_settings_load_from_the_service_environment(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(TALLY[name])
    assert unknown_settings(env) == []
    assert settings_problem(env, monkeypatch, tmp_path) is None


def test_image_installs_the_project() -> None:
    assert dockerfile_problems(COMPOSE) == []
    assert dockerignore_problems() == []


def test_kafka_is_the_release_the_engines_pin() -> None:
    assert kafka_version_problem(COMPOSE) is None


# --- the checks bite ----------------------------------------------------------------


def test_an_unknown_flag_fails_the_command_check(tmp_path: Path) -> None:
    problems = command_problems(["ingest", "--sink", "olap", "--no-such-flag"], {}, tmp_path)
    assert len(problems) == 1 and "No such option: --no-such-flag" in problems[0]


def test_an_unknown_subcommand_fails_the_command_check(tmp_path: Path) -> None:
    (problem,) = command_problems(["compaction", "wacth"], {}, tmp_path)
    assert "wacth" in problem


def test_a_bad_option_value_fails_though_help_passes(tmp_path: Path) -> None:
    # --help is eager: it exits 0 before --log-format's value is checked.
    argv = ["ingest", "--log-format", "yaml"]
    (problem,) = command_problems(argv, {}, tmp_path)
    assert "yaml" in problem and "--help" not in problem
    assert parse_problem(["serve", "--port", "70000"]) is not None
    assert parse_problem(["compaction"]) is not None  # a group, not a command


def test_a_bad_setting_value_fails_the_command_and_settings_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"TALLY_DATA_DIR": "/data", "TALLY_API__PORT": "70000"}
    (problem,) = command_problems(["serve", "--host", "0.0.0.0"], env, tmp_path)
    assert "exit 1" in problem and "api.port" in problem
    assert "api.port" in (settings_problem(env, monkeypatch, tmp_path) or "")


def test_a_misspelled_setting_name_is_caught() -> None:
    # Settings itself ignores an unknown top-level TALLY_ name, so this check must not.
    env = {"TALLY_KAFKA_BOOTSTRAPS": "kafka:9092", "TALLY_STORE__GC_GRACE": "1", "OTHER": "x"}
    assert unknown_settings(env) == [
        "TALLY_KAFKA_BOOTSTRAPS: no such setting",
        "TALLY_STORE__GC_GRACE: no such setting",
    ]
    assert unknown_settings({"TALLY_STORE__GC_GRACE_S": "1", "tally_api__port": "1"}) == []


def broken(change: Any) -> list[str]:
    compose = copy.deepcopy(COMPOSE)
    change(compose["services"])
    return compose_problems(compose)


def test_each_compose_check_bites() -> None:
    def env(service: str, **values: str) -> Any:
        return lambda s: s[service].__setitem__(
            "environment", {**s[service]["environment"], **values}
        )

    assert "missing service watcher" in broken(lambda s: s.pop("watcher"))
    assert any(
        "TALLY_KAFKA_BOOTSTRAP=localhost:9094" in p
        for p in broken(env("ingest-olap", TALLY_KAFKA_BOOTSTRAP="localhost:9094"))
    )
    assert "watcher: no named volume at TALLY_DATA_DIR=/var/tally" in broken(
        env("watcher", TALLY_DATA_DIR="/var/tally")
    )
    assert "api: TALLY_API__WORKER: no such setting" in broken(env("api", TALLY_API__WORKER="2"))
    assert "kafka: auto.create.topics.enable is not false" in broken(
        env("kafka", KAFKA_AUTO_CREATE_TOPICS_ENABLE="true")
    )
    assert any("CLUSTER_ID" in p for p in broken(env("kafka", CLUSTER_ID="tally-cluster")))
    assert "ingest-search: does not wait for the topics to be created" in broken(
        lambda s: s["ingest-search"].pop("depends_on")
    )
    assert "watcher: restart is 'no', not 'unless-stopped'" in broken(
        lambda s: s["watcher"].__setitem__("restart", "no")
    )
    assert any(
        "api: healthcheck" in p
        for p in broken(lambda s: s["api"].__setitem__("command", ["serve", "--port", "9000"]))
    )


def test_image_checks_bite() -> None:
    compose = copy.deepcopy(COMPOSE)
    compose["services"]["api"]["build"] = {"context": "..", "dockerfile": "Dockerfile"}
    assert any("not docker/Dockerfile" in p for p in dockerfile_problems(compose))
    allow = "*\n!pyproject.toml\n!README.md\n!tally\n"
    assert "Dockerfile.dockerignore: leaves out query_api" in dockerignore_problems(allow)
    compose["services"]["kafka"]["image"] = "apache/kafka:4.1.0"
    assert "apache/kafka:4.1.0" in (kafka_version_problem(compose) or "")


# --- on Druid: compose.yaml with compose.druid.yaml applied ---------------------------

ON_DRUID = merged(COMPOSE, load_compose(DRUID_OVERRIDE))
TALLY_ON_DRUID = tally_services(ON_DRUID)


def test_the_druid_override_fits_and_points_every_tally_process_at_druid() -> None:
    assert set(TALLY_ON_DRUID) == {*TALLY, "druid-apply"}
    assert compose_problems(ON_DRUID) == []
    assert druid_problems(ON_DRUID) == []


@pytest.mark.parametrize("name", sorted(TALLY_ON_DRUID))
def test_on_druid_each_command_and_its_settings_are_accepted(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = TALLY_ON_DRUID[name]
    env = environment(service)
    assert command_problems(service["command"], env, tmp_path) == []
    assert unknown_settings(env) == []
    assert settings_problem(env, monkeypatch, tmp_path) is None


def test_druid_checks_bite() -> None:
    def broken_on_druid(change: Any) -> list[str]:
        compose = copy.deepcopy(ON_DRUID)
        change(compose["services"])
        return druid_problems(compose)

    def env(service: str, **values: str) -> Any:
        return lambda s: s[service].__setitem__(
            "environment", {**s[service]["environment"], **values}
        )

    assert "druid-broker: image apache/druid:32.0.0 is not apache/druid:33.0.0" in (
        broken_on_druid(lambda s: s["druid-broker"].__setitem__("image", "apache/druid:32.0.0"))
    )
    assert any(
        p.startswith("api: TALLY_DRUID__BROKER_URL=http://druid-historical:8083")
        for p in broken_on_druid(env("api", TALLY_DRUID__BROKER_URL="http://druid-historical:8083"))
    )
    assert "watcher: TALLY_STORE__BACKEND is not druid" in broken_on_druid(
        env("watcher", TALLY_STORE__BACKEND="embedded")
    )
    assert "the historical and the indexer do not share the deep-storage volume" in (
        broken_on_druid(lambda s: s["druid-indexer"].__setitem__("volumes", []))
    )
    assert "the coordinator does not run the overlord" in broken_on_druid(
        env("druid-coordinator", druid_coordinator_asOverlord_enabled="false")
    )
    assert "no Druid indexer service" in broken_on_druid(lambda s: s.pop("druid-indexer"))
    assert "druid-apply: does not wait for the overlord to be healthy" in broken_on_druid(
        lambda s: s["druid-apply"].pop("depends_on")
    )


def test_the_override_merges_as_compose_does() -> None:
    """Mappings merge key by key, lists and scalars are replaced."""
    base = {"services": {"a": {"command": ["x"], "environment": {"K": "1", "L": "2"}}}}
    over = {"x-anchor": {}, "services": {"a": {"command": ["y"], "environment": {"K": "3"}}}}
    assert merged(base, over) == {
        "services": {"a": {"command": ["y"], "environment": {"K": "3", "L": "2"}}}
    }


# --- on StarRocks: compose.yaml with compose.starrocks.yaml applied -------------------

ON_STARROCKS = merged(COMPOSE, load_compose(STARROCKS_OVERRIDE))
TALLY_ON_STARROCKS = tally_services(ON_STARROCKS)


def test_the_starrocks_override_fits_and_points_every_tally_process_at_it() -> None:
    assert set(TALLY_ON_STARROCKS) == {*TALLY, "starrocks-apply"}
    assert compose_problems(ON_STARROCKS) == []
    assert starrocks_problems(ON_STARROCKS) == []


@pytest.mark.parametrize("name", sorted(TALLY_ON_STARROCKS))
def test_on_starrocks_each_command_and_its_settings_are_accepted(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = TALLY_ON_STARROCKS[name]
    env = environment(service)
    assert command_problems(service["command"], env, tmp_path) == []
    assert unknown_settings(env) == []
    assert settings_problem(env, monkeypatch, tmp_path) is None


def test_starrocks_checks_bite() -> None:
    def broken(change: Any) -> list[str]:
        compose = copy.deepcopy(ON_STARROCKS)
        change(compose["services"])
        return starrocks_problems(compose)

    assert "watcher: TALLY_STORE__BACKEND is not starrocks" in broken(
        lambda s: s["watcher"]["environment"].__setitem__("TALLY_STORE__BACKEND", "embedded")
    )
    assert "api: starts before starrocks-apply has created the tables" in broken(
        lambda s: s["api"].__setitem__("depends_on", {})
    )
    assert "starrocks: port 8040 is not published" in broken(
        lambda s: s["starrocks"].__setitem__("ports", ["9030:9030", "8030:8030"])
    )
