"""Checks of docker/compose.yaml that need no Docker engine (none runs on this machine).

Each check returns the problems it found, one line each, so a test can both assert a
clean file has none and prove, on a deliberately broken copy, that the check bites.
"""

from __future__ import annotations

import base64
import binascii
import copy
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.core import TyperGroup

from tally.cli import app
from tally.errors import ConfigError
from tally.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DRUID_OVERRIDE = DOCKER / "compose.druid.yaml"
STARROCKS_OVERRIDE = DOCKER / "compose.starrocks.yaml"
ONE_SHOTS = {
    "topics",
    "druid-apply",
    "starrocks-apply",
}  # run to completion at each `up`, never restarted

Service = dict[str, Any]


def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a mapping"
    return data


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` applied to ``base`` as ``docker compose -f base -f override`` does for
    what these files use: mappings merge key by key (a service's ``environment`` and
    ``depends_on`` too), anything else — ``command``, ``volumes`` lists — is replaced."""
    out = dict(base)
    for key, value in override.items():
        if key.startswith("x-"):
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def is_tally(service: Service) -> bool:
    """Built from docker/Dockerfile, tagged tally, or entered through `tally`."""
    image = str(service.get("image", ""))
    return (
        "build" in service
        or image.rsplit("/", 1)[-1].split(":")[0] == "tally"
        or service.get("entrypoint") in ("tally", ["tally"])
    )


def tally_services(compose: dict[str, Any]) -> dict[str, Service]:
    return {n: s for n, s in compose.get("services", {}).items() if is_tally(s)}


def environment(service: Service) -> dict[str, str]:
    """A service's environment as Compose passes it (list or mapping form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# --- commands ---------------------------------------------------------------------


def parse_problem(argv: list[str]) -> str | None:
    """Parse ``argv`` as the CLI would, without running it: ``--help`` is eager, so
    it passes a bad option value (``--log-format yaml``) that this rejects."""
    cmd: Any = typer.main.get_command(app)
    args = list(argv)
    path = ["tally"]
    while isinstance(cmd, TyperGroup) and args and not args[0].startswith("-"):
        sub = cmd.get_command(typer.Context(cmd), args[0])
        if sub is None:
            return f"tally: no such command {args[0]!r}"
        cmd, path = sub, [*path, args.pop(0)]
    if isinstance(cmd, TyperGroup) and not cmd.invoke_without_command:
        # (a group that runs by itself, ``tally ingest``, parses its options below)
        return f"{' '.join(path)}: a group, not a command"
    try:
        cmd.make_context(" ".join(path), args)
    except typer.TyperException as exc:
        return f"{' '.join(path)}: {exc.format_message()}"
    return None


def help_problem(argv: list[str], env: dict[str, str], cwd: Path) -> str | None:
    """``python -m tally <argv> --help`` with the service's environment must exit 0.
    The root command loads the settings first, so a bad ``TALLY_*`` value fails too."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "tally", *argv, "--help"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=cwd,
        timeout=120,
        check=False,
    )
    if proc.returncode == 0:
        return None
    reason = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"tally {' '.join(argv)} --help: exit {proc.returncode}: {reason}"


def command_problems(argv: Any, env: dict[str, str], cwd: Path) -> list[str]:
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        return [f"command must be a list of strings, not {argv!r}"]
    found = help_problem(argv, env, cwd) or parse_problem(argv)
    return [found] if found else []


# --- settings ---------------------------------------------------------------------


def unknown_settings(env: dict[str, str]) -> list[str]:
    """``TALLY_*`` names that are no setting. Settings ignores an unknown top-level
    name (``TALLY_KAFKA_BOOTSTRAPS``) silently, so building it does not catch those."""
    problems = []
    for name in env:
        if not name.upper().startswith("TALLY_"):
            continue
        model: type[BaseModel] | None = Settings
        for key in name[len("TALLY_") :].lower().split("__"):
            field = model.model_fields.get(key) if model is not None else None
            if field is None:
                problems.append(f"{name}: no such setting")
                break
            kind = field.annotation
            model = kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return problems


def settings_problem(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> str | None:
    """Load the settings as a process with exactly this environment would (in ``cwd``,
    away from any tally.toml)."""
    for name in os.environ:
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cwd)
    try:
        load_settings()
    except ConfigError as exc:
        return exc.message
    return None


# --- the file as a whole ----------------------------------------------------------


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Everything checkable without running anything."""
    services = compose.get("services", {})
    problems = [
        f"missing service {n}"
        for n in ("kafka", "topics", "ingest-olap", "ingest-search", "watcher", "api")
        if n not in services
    ]
    if "kafka" in services:
        problems += kafka_problems(services["kafka"], compose)
    tally = tally_services(compose)
    problems += bootstrap_problems(tally, services.get("kafka", {}))
    problems += volume_problems(tally, compose)
    problems += lifecycle_problems(tally)
    if "api" in services:
        problems += api_problems(services["api"])
    for name, service in tally.items():
        problems += [f"{name}: {p}" for p in unknown_settings(environment(service))]
    return problems


def kafka_problems(kafka: Service, compose: dict[str, Any]) -> list[str]:
    env = environment(kafka)
    problems = []
    image = str(kafka.get("image", ""))
    repo, _, tag = image.partition(":")
    if repo != "apache/kafka" or not tag.startswith("4."):
        problems.append(f"kafka: image {image!r} is not apache/kafka pinned to a 4.x tag")
    roles = set(env.get("KAFKA_PROCESS_ROLES", "").split(","))
    if roles != {"broker", "controller"}:
        problems.append("kafka: not a combined KRaft broker,controller")
    try:
        if len(base64.urlsafe_b64decode(env.get("CLUSTER_ID", "") + "==")) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        problems.append("kafka: CLUSTER_ID is not a base64 UUID (kafka-storage format fails)")
    if env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "").lower() != "false":
        problems.append("kafka: auto.create.topics.enable is not false")
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        if env.get(key) != "1":
            problems.append(f"kafka: {key} must be 1 on a single node")
    log_dirs = env.get("KAFKA_LOG_DIRS")
    if not log_dirs or log_dirs not in named_mounts(kafka, compose).values():
        problems.append("kafka: KAFKA_LOG_DIRS is not on a named volume")
    if "test" not in (kafka.get("healthcheck") or {}):
        problems.append("kafka: no healthcheck")
    return problems


def internal_listeners(kafka: Service) -> set[str]:
    """host:port of the advertised PLAINTEXT listeners other containers reach."""
    env = environment(kafka)
    protocols = dict(
        p.split(":", 1) for p in env.get("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "").split(",") if p
    )
    names = {"kafka", str(kafka.get("hostname", "kafka"))}
    found = set()
    for listener in env.get("KAFKA_ADVERTISED_LISTENERS", "").split(","):
        name, _, address = listener.partition("://")
        if protocols.get(name) == "PLAINTEXT" and address.rsplit(":", 1)[0] in names:
            found.add(address)
    return found


def bootstrap_problems(tally: dict[str, Service], kafka: Service) -> list[str]:
    listeners = internal_listeners(kafka)
    problems = []
    for name, service in tally.items():
        bootstrap = environment(service).get("TALLY_KAFKA_BOOTSTRAP")
        if bootstrap not in listeners:
            problems.append(
                f"{name}: TALLY_KAFKA_BOOTSTRAP={bootstrap} is none of kafka's {sorted(listeners)}"
            )
    return problems


def named_mounts(service: Service, compose: dict[str, Any]) -> dict[str, str]:
    """Named volume -> mount path, short or long syntax."""
    declared = compose.get("volumes") or {}
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = volume.get("source", ""), volume.get("target", "")
        if source in declared:
            mounts[source] = target
    return mounts


def volume_problems(tally: dict[str, Service], compose: dict[str, Any]) -> list[str]:
    problems, used = [], set()
    for name, service in tally.items():
        data_dir = environment(service).get("TALLY_DATA_DIR")
        at = [v for v, target in named_mounts(service, compose).items() if target == data_dir]
        if not at:
            problems.append(f"{name}: no named volume at TALLY_DATA_DIR={data_dir}")
        used.update(at)
    if len(used) > 1:
        problems.append(f"Tally services mount different data volumes: {sorted(used)}")
    return problems


def lifecycle_problems(tally: dict[str, Service]) -> list[str]:
    """Daemons restart and stop gracefully; consumers wait for Kafka and the topics."""
    problems = []
    for name, service in tally.items():
        one_shot = name in ONE_SHOTS
        wanted = "no" if one_shot else "unless-stopped"
        if str(service.get("restart")) != wanted:
            problems.append(f"{name}: restart is {service.get('restart')!r}, not {wanted!r}")
        if not one_shot and "stop_grace_period" not in service:
            problems.append(f"{name}: no stop_grace_period for its SIGTERM shutdown")
        command = service.get("command") or []
        waits = {
            dep: cond.get("condition") if isinstance(cond, dict) else None
            for dep, cond in (service.get("depends_on") or {}).items()
        }
        topics = name == "topics"
        if command[:1] == ["ingest"] or command[:2] == ["compaction", "watch"] or topics:
            if waits.get("kafka") != "service_healthy":
                problems.append(f"{name}: does not wait for kafka to be healthy")
            if not topics and waits.get("topics") != "service_completed_successfully":
                problems.append(f"{name}: does not wait for the topics to be created")
    return problems


def api_problems(api: Service) -> list[str]:
    command = api.get("command") or []
    port = command[command.index("--port") + 1] if "--port" in command else "8000"
    probe = " ".join(map(str, (api.get("healthcheck") or {}).get("test", [])))
    if f":{port}/readyz" not in probe:
        return [f"api: healthcheck does not ask /readyz on port {port}: {probe!r}"]
    return []


# --- the image --------------------------------------------------------------------


def dockerfile_problems(compose: dict[str, Any]) -> list[str]:
    """Every Tally service builds docker/Dockerfile, which installs the project."""
    problems = []
    for name, service in tally_services(compose).items():
        build = service.get("build") or {}
        context = COMPOSE.parent / str(build.get("context", "."))
        dockerfile = (context / str(build.get("dockerfile", "Dockerfile"))).resolve()
        if dockerfile != DOCKER / "Dockerfile":
            problems.append(f"{name}: builds {dockerfile}, not docker/Dockerfile")
        elif context.resolve() != REPO:
            problems.append(f"{name}: build context {context} is not the repository root")
    lines = instructions((DOCKER / "Dockerfile").read_text())
    if not any(line.startswith("FROM python:3.11-slim") for line in lines):
        problems.append("Dockerfile: not FROM python:3.11-slim")
    if not any(
        line.startswith("RUN pip install . ") or line == "RUN pip install ." for line in lines
    ):
        problems.append("Dockerfile: does not `pip install .`")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    if not users or users[-1] in ("root", "0"):
        problems.append("Dockerfile: runs as root")
    if 'ENTRYPOINT ["tally"]' not in lines:
        problems.append('Dockerfile: ENTRYPOINT is not ["tally"]')
    return problems


def instructions(dockerfile: str) -> list[str]:
    """One line per instruction: continuations joined, comments dropped."""
    joined = dockerfile.replace("\\\n", " ")
    lines = (" ".join(line.split()) for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignore_problems(ignore: str | None = None) -> list[str]:
    """The build context is an allowlist; it must let in all that `pip install .` reads."""
    if ignore is None:
        ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    rules = [r.strip() for r in ignore.splitlines() if r.strip() and not r.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += [pattern.rstrip("*") for pattern in include]
    if rules[:1] != ["*"]:
        return ["Dockerfile.dockerignore: does not start by ignoring everything (*)"]
    return [f"Dockerfile.dockerignore: leaves out {n}" for n in needed if f"!{n}" not in rules]


_POM_NS = "http://maven.apache.org/POM/4.0.0"


def kafka_version_problem(compose: dict[str, Any]) -> str | None:
    """The compose Kafka is the release `tally engines up kafka` pins (README says so)."""
    pom = ET.parse(REPO / "engines" / "poms" / "kafka" / "pom.xml")
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    for dep in pom.iterfind(".//m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == "kafka_2.13":
            pinned = dep.findtext("m:version", namespaces=ns)
            image = compose["services"]["kafka"].get("image")
            if image != f"apache/kafka:{pinned}":
                return f"kafka image {image} is not apache/kafka:{pinned}, the engines' pin"
            return None
    return "engines/poms/kafka/pom.xml pins no kafka_2.13"


# --- the Druid override -----------------------------------------------------------


def pinned_druid_version() -> str | None:
    pom = ET.parse(REPO / "engines" / "poms" / "druid" / "pom.xml")
    return pom.findtext(".//m:properties/m:druid.version", namespaces={"m": _POM_NS})


def _host(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]


def druid_problems(compose: dict[str, Any]) -> list[str]:
    """compose.yaml with compose.druid.yaml applied: Druid's services fit together and
    every Tally process is pointed at them."""
    services = compose.get("services", {})
    problems = []
    druid = {
        n: s for n, s in services.items() if str(s.get("image", "")).startswith("apache/druid:")
    }
    roles = {str((s.get("command") or [""])[0]): n for n, s in druid.items()}
    for role in ("coordinator", "broker", "historical", "indexer"):
        if role not in roles:
            problems.append(f"no Druid {role} service")
    pinned = pinned_druid_version()
    for name, service in druid.items():
        if service["image"] != f"apache/druid:{pinned}":
            problems.append(f"{name}: image {service['image']} is not apache/druid:{pinned}")
    coordinator = services.get(roles.get("coordinator", ""), {})
    if environment(coordinator).get("druid_coordinator_asOverlord_enabled") != "true":
        problems.append("the coordinator does not run the overlord")
    shared = {}
    for role in ("historical", "indexer"):  # local deep storage: both must see one volume
        service = services.get(roles.get(role, ""), {})
        where = environment(service).get("druid_storage_storageDirectory", "")
        shared[role] = {v for v, t in named_mounts(service, compose).items() if where.startswith(t)}
    if not shared["historical"] & shared["indexer"]:
        problems.append("the historical and the indexer do not share the deep-storage volume")
    want = {
        "TALLY_DRUID__BROKER_URL": roles.get("broker"),
        "TALLY_DRUID__OVERLORD_URL": roles.get("coordinator"),
        "TALLY_DRUID__COORDINATOR_URL": roles.get("coordinator"),
    }
    for name, service in tally_services(compose).items():
        env = environment(service)
        if env.get("TALLY_STORE__BACKEND") != "druid":
            problems.append(f"{name}: TALLY_STORE__BACKEND is not druid")
        for key, host in want.items():
            if host is None or _host(env.get(key, "")) != host:
                problems.append(f"{name}: {key}={env.get(key)} is not the {host} service")
    apply = services.get("druid-apply", {})
    waits = apply.get("depends_on") or {}
    if (waits.get(roles.get("coordinator", "")) or {}).get("condition") != "service_healthy":
        problems.append("druid-apply: does not wait for the overlord to be healthy")
    return problems


def starrocks_problems(compose: dict[str, Any]) -> list[str]:
    """compose.yaml with compose.starrocks.yaml applied: one StarRocks, its query and
    HTTP ports, every Tally process pointed at it, the tables created before the
    processes that use them start."""
    services = compose.get("services", {})
    problems = []
    found = [n for n, s in services.items() if str(s.get("image", "")).startswith("starrocks/")]
    if len(found) != 1:
        return [f"expected one StarRocks service, found {found}"]
    (name,) = found
    ports = {str(p).split(":")[-1] for p in services[name].get("ports", [])}
    for port in ("9030", "8030", "8040"):
        if port not in ports:
            problems.append(f"{name}: port {port} is not published")
    if not services[name].get("healthcheck"):
        problems.append(f"{name}: no healthcheck")
    for tally, service in tally_services(compose).items():
        env = environment(service)
        if env.get("TALLY_STORE__BACKEND") != "starrocks":
            problems.append(f"{tally}: TALLY_STORE__BACKEND is not starrocks")
        if env.get("TALLY_STARROCKS__HOST") != name:
            problems.append(f"{tally}: TALLY_STARROCKS__HOST is not the {name} service")
        if _host(env.get("TALLY_STARROCKS__HTTP_URL", "")) != name:
            problems.append(f"{tally}: TALLY_STARROCKS__HTTP_URL is not the {name} service")
    apply = services.get("starrocks-apply", {})
    if (apply.get("command") or [])[:2] != ["starrocks", "apply"]:
        problems.append("starrocks-apply: does not run `tally starrocks apply`")
    if ((apply.get("depends_on") or {}).get(name) or {}).get("condition") != "service_healthy":
        problems.append("starrocks-apply: does not wait for StarRocks to be healthy")
    for user in ("ingest-olap", "watcher", "api"):
        waits = services.get(user, {}).get("depends_on") or {}
        if (waits.get("starrocks-apply") or {}).get(
            "condition"
        ) != "service_completed_successfully":
            problems.append(f"{user}: starts before starrocks-apply has created the tables")
    return problems
