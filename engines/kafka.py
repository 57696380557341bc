"""Apache Kafka 4.x in KRaft mode: one node that is both broker and controller.

Ports are chosen free on first start and kept in ``state.json``, with the cluster id,
so a restart (after ``down`` or a crash) comes back on the same bootstrap address with
its data, and Tally processes that were connected reconnect by themselves. Storage is
formatted once. Readiness is a metadata request answered with this cluster's id.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from engines import maven
from engines.base import Engine, free_loopback_ports, java_binary, log_tail
from engines.process import ProcessRecord, spawn
from tally.errors import EngineError

HEAP = ["-Xms128m", "-Xmx512m"]

_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = warn
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""


def pinned_version() -> str:
    """Kafka's version as pinned in the engine's pom (the one source of truth)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(maven.pom_path("kafka")).getroot()
    for dep in root.iterfind("m:dependencies/m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == "kafka_2.13":
            return dep.findtext("m:version", default="?", namespaces=ns)
    return "?"


def new_cluster_id() -> str:
    """Kafka's Uuid text form: 16 random bytes, URL-safe base64, no padding, no leading '-'."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):
            return text


def server_properties(broker_port: int, controller_port: int, data: Path) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # A consumer group's first member starts at once instead of after 3 s.
        "group.initial.rebalance.delay.ms": "0",
        # A crashed member's partitions move after its session timeout; a local broker
        # lets that be 3 s (Kafka's floor is 6 s), so a restarted ingester resumes soon.
        "group.min.session.timeout.ms": "2000",
        # After a crash the controller refuses the restarted broker until the old
        # incarnation's session expires (default 9 s): keep that short.
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "3000",
        # A topic's retention settings take effect within a second (default: checked
        # every 5 min), so what retention removes from a log is seen soon.
        "log.retention.check.interval.ms": "1000",
        # Tally creates its topics (`tally topics create`); a typo must not make one.
        "auto.create.topics.enable": "false",
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())


class KafkaEngine(Engine):
    name = "kafka"

    @property
    def bootstrap(self) -> str | None:
        port = self.state().get("ports", {}).get("broker")
        return f"127.0.0.1:{port}" if port else None

    def resolve(self) -> Path:
        return maven.resolve(self.name, self.home)

    def _configure(self) -> dict[str, Any]:
        """First start: choose ports and a cluster id; later starts reuse them."""
        doc = self.state()
        if "ports" not in doc:
            broker, controller = free_loopback_ports(2)
            doc = {"ports": {"broker": broker, "controller": controller}}
            doc["cluster_id"] = new_cluster_id()
            self.save_state(doc)
        ports = doc["ports"]
        self.require_free(ports)
        (self.dir / "server.properties").write_text(
            server_properties(int(ports["broker"]), int(ports["controller"]), self.dir / "data")
        )
        (self.dir / "log4j2.properties").write_text(_LOG4J)
        return doc

    def _java(self, artifacts: Path, main: str, *args: str) -> list[str]:
        return [
            java_binary(),
            *HEAP,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
            "-cp",
            f"{artifacts}/*",
            main,
            *args,
        ]

    def start(self, artifacts: Path) -> ProcessRecord:
        doc = self._configure()
        config = str(self.dir / "server.properties")
        if not (self.dir / "data" / "meta.properties").exists():
            fmt = [*self._java(artifacts, "kafka.tools.StorageTool", "format")]
            fmt += ["--config", config, "--cluster-id", doc["cluster_id"], "--ignore-formatted"]
            with self.log.open("ab") as out:
                ran = subprocess.run(fmt, stdout=out, stderr=subprocess.STDOUT, check=False)
            if ran.returncode != 0:
                raise EngineError(
                    f"kafka storage format failed (log {self.log}): {log_tail(self.log)}"
                )
        return spawn(self._java(artifacts, "kafka.Kafka", config), self.log, self.dir)

    def answers(self, timeout_s: float) -> bool:
        bootstrap = self.bootstrap
        if bootstrap is None:
            return False
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "log_level": 0,
            "error_cb": lambda _err: None,
            "socket.connection.setup.timeout.ms": 1000,
            "reconnect.backoff.max.ms": 200,  # notice a broker that just came up
        }
        admin = AdminClient(conf)
        try:
            meta = admin.list_topics(timeout=timeout_s)
        except KafkaException:
            return False
        # Our cluster, not some other broker that took the port meanwhile.
        return bool(meta.brokers) and meta.cluster_id == self.state().get("cluster_id")

    def describe(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap, "version": pinned_version()}

    def env(self) -> dict[str, str]:
        bootstrap = self.bootstrap
        return {"TALLY_KAFKA_BOOTSTRAP": bootstrap} if bootstrap else {}


ENGINE = KafkaEngine
