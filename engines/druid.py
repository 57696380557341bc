"""Apache Druid 33 on loopback: ZooKeeper and four Druid JVMs, all from Maven Central.

Why this layout (see docs/adr/0003-druid-from-maven-central.md):

- **Druid 33.0.0, not 37.** Maven Central as reached here serves ``druid-services``
  37.0.0, but ``org.apache.druid.extensions:druid-kafka-indexing-service`` only at
  0.14.0-incubating, 0.17.1, 0.20.0 and 33.0.0. Mixing a 37 server with a 33 extension
  would load classes built against another ``druid-indexing-service``; 33.0.0 is the
  newest release whose server and Kafka ingestion come as a pair, and it supports
  Java 17 (the machine's default).
- **Plain ``org.apache.druid.cli.Main server <service>`` JVMs.** The binary tarball is
  not on Central (``org.apache.druid:distribution`` has a pom only), and the embedded
  test cluster (``EmbeddedDruidCluster`` in the druid-services test-jar) is published
  for 37 but not for 33 (and it is test code, not the servers' own wiring). Druid has
  no single-JVM mode, so the processes are those of a one-machine cluster: ZooKeeper
  (``ZooKeeperServerMain``, from the zookeeper jar Druid's curator brings), a
  coordinator acting as overlord (it also runs the Derby metadata server), a broker, a
  historical and an **indexer** (tasks run as threads in it; a middleManager forks
  peons through a script only the tarball has). No router: the broker answers SQL.
- **Extensions from the classpath.** ``druid.extensions.loadList=[]`` loads nothing
  from an extensions directory; ``searchCurrentClassloader`` (on) finds the Kafka
  indexing service's module on the one classpath every role shares. The
  multi-stage-query engine is not there (33's druid-services does not depend on it).
  ``org.hyperic:sigar`` is excluded: it is served only outside Central and only feeds
  the system monitor, which is off.
- **Sizes of Druid's nano quickstart, smaller still**: heaps of 384-640 MiB, 32 MiB
  processing buffers, one processing thread, the serial collector.

Everything lives under ``<data dir>/engines/druid/``: a config directory per role
(regenerated on each start from ``state.json``, which keeps the six loopback ports
chosen on the first start), Derby's database, local deep storage, the historical's
segment cache, the indexer's task directory, task logs, ZooKeeper's data, and one log
and one pid file per role. So a restart comes back on the same ports with the same
datasources; a role that died is started again alone. Every role listens on 127.0.0.1
alone (``druid.bindOnHost``; ZooKeeper's ``clientPortAddress``; Derby's host).

Readiness is each role's own answer, not an open port: ZooKeeper ``ruok``; the
coordinator's and the overlord's leader (both this process); the broker running SQL
``SELECT 1``; the historical ready and listed by the coordinator as serving; the
indexer healthy and registered with the overlord as a worker.

Measured on this machine (2 cores shared with other sessions, load average 8-14,
Java 17), with ``tally engines`` and ``ps -o rss``:

- first resolution into an empty ``TALLY_ENGINES_HOME``: 130 s; 209 jars, 192 MiB
  (227 MiB of Maven repository beside them);
- cold start to ready, empty data: 62 s; ``down``: 2-4 s; ``up`` again with data: 55 s;
- RSS with a Kafka supervisor task running: ZooKeeper 118 MiB, coordinator-overlord
  306 MiB, broker 348 MiB, historical 324 MiB, indexer 371 MiB; 1.47 GiB in all.
"""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from engines import maven
from engines.base import free_loopback_ports, java_binary, port_taken
from engines.group import ProcessGroupEngine
from engines.process import ProcessRecord, spawn
from tally.errors import EngineError

SERVICES = ("coordinator", "broker", "historical", "indexer")
PORTS = ("zookeeper", "derby", *SERVICES)

# Heap and direct memory per role (MiB). Direct memory must hold the processing
# buffers: (numThreads + numMergeBuffers + 1) x buffer.sizeBytes = 4 x 32 MiB.
MEMORY: dict[str, tuple[int, int]] = {
    "zookeeper": (128, 64),
    "coordinator": (384, 128),
    "broker": (384, 256),
    "historical": (384, 256),
    "indexer": (768, 256),
}

# Druid uses JDK internals (druid.apache.org/docs/latest/operations/java).
_JAVA17 = [
    "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
    "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED",
    "--add-opens=java.base/jdk.internal.ref=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/java.lang=ALL-UNNAMED",
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
]

_LOG4J = """\
<?xml version="1.0" encoding="UTF-8" ?>
<Configuration status="WARN">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} %p [%t] %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="info"><AppenderRef ref="out"/></Root>
    <Logger name="org.apache.druid.server.QueryLifecycle" level="warn"/>
    <Logger name="org.apache.druid.jetty.RequestLog" level="warn"/>
    <Logger name="org.apache.zookeeper" level="warn"/>
    <Logger name="org.apache.curator" level="warn"/>
    <Logger name="org.apache.kafka" level="warn"/>
  </Loggers>
</Configuration>
"""


def pinned_version() -> str:
    """Druid's version as pinned in the engine's pom (the one source of truth)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(maven.pom_path("druid")).getroot()
    return root.findtext("m:properties/m:druid.version", default="?", namespaces=ns)


def _props(settings: dict[str, Any]) -> str:
    return "".join(
        f"{k}={v if isinstance(v, str) else json.dumps(v)}\n" for k, v in settings.items()
    )


class DruidEngine(ProcessGroupEngine):
    name = "druid"
    stages = (("zookeeper",), SERVICES)
    primary = "coordinator"
    start_timeout_s = 300.0
    stop_grace_s = 45.0

    # -- addresses ------------------------------------------------------------------------

    def port(self, role: str) -> int | None:
        port = self.state().get("ports", {}).get(role)
        return int(port) if port else None

    def url(self, role: str) -> str | None:
        port = self.port(role)
        return f"http://127.0.0.1:{port}" if port else None

    # -- configuration --------------------------------------------------------------------

    def resolve(self) -> Path:
        return maven.resolve(self.name, self.home)

    def configure(self) -> None:
        doc = self.state()
        if "ports" not in doc:
            doc = {"ports": dict(zip(PORTS, free_loopback_ports(len(PORTS)), strict=True))}
            self.save_state(doc)
        ports = {role: int(p) for role, p in doc["ports"].items()}
        for role, port in ports.items():
            held = self.role_running("coordinator" if role == "derby" else role)
            if held is None and port_taken(port):
                raise EngineError(
                    f"druid's {role} port 127.0.0.1:{port} (kept from its first start) is"
                    " held by another process"
                )
        for sub in ("metadata", "deep", "segment-cache", "task", "task-logs", "tmp", "zk"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        conf = self.dir / "conf"
        (conf / "_common").mkdir(parents=True, exist_ok=True)
        (conf / "log4j2.xml").write_text(_LOG4J)
        (conf / "_common" / "common.runtime.properties").write_text(_props(self._common(ports)))
        for service in SERVICES:
            (conf / service).mkdir(exist_ok=True)
            settings = {"druid.service": f"druid/{service}", "druid.plaintextPort": ports[service]}
            settings |= self._service(service)
            (conf / service / "runtime.properties").write_text(_props(settings))
        (conf / "zoo.cfg").write_text(
            _props(
                {
                    "dataDir": str(self.dir / "zk"),
                    "clientPort": ports["zookeeper"],
                    "clientPortAddress": "127.0.0.1",
                    "tickTime": 2000,
                    "maxClientCnxns": 0,
                    "admin.enableServer": "false",
                    "4lw.commands.whitelist": "ruok",
                    "autopurge.purgeInterval": 1,
                }
            )
        )

    def _common(self, ports: dict[str, int]) -> dict[str, Any]:
        d = self.dir
        return {
            "druid.host": "127.0.0.1",
            "druid.bindOnHost": "true",  # listen on 127.0.0.1 alone, not 0.0.0.0
            # Jetty otherwise waits up to 30 s for the overlord's long polls on `down`.
            "druid.server.http.gracefulShutdownTimeout": "PT1S",
            "druid.extensions.loadList": [],
            "druid.extensions.searchCurrentClassloader": "true",
            "druid.extensions.directory": str(d / "tmp" / "no-extensions"),
            "druid.extensions.hadoopDependenciesDir": str(d / "tmp" / "no-hadoop"),
            "druid.startup.logging.logProperties": "false",
            "druid.zk.service.host": f"127.0.0.1:{ports['zookeeper']}",
            "druid.zk.paths.base": "/druid",
            "druid.metadata.storage.type": "derby",
            # A name relative to derby.system.home (the coordinator's -D below).
            "druid.metadata.storage.connector.connectURI": (
                f"jdbc:derby://127.0.0.1:{ports['derby']}/druid;create=true"
            ),
            "druid.metadata.storage.connector.host": "127.0.0.1",
            "druid.metadata.storage.connector.port": ports["derby"],
            "druid.storage.type": "local",
            "druid.storage.storageDirectory": str(d / "deep"),
            "druid.indexer.logs.type": "file",
            "druid.indexer.logs.directory": str(d / "task-logs"),
            "druid.selectors.indexing.serviceName": "druid/overlord",
            "druid.selectors.coordinator.serviceName": "druid/coordinator",
            "druid.monitoring.monitors": [],
            "druid.emitter": "noop",
            "druid.indexing.doubleStorage": "double",
            "druid.sql.enable": "true",
            "druid.lookup.enableLookupSyncOnStartup": "false",
            "druid.processing.tmpDir": str(d / "tmp" / "processing"),
            "druid.processing.buffer.sizeBytes": "32MiB",
            "druid.processing.numMergeBuffers": 2,
            "druid.processing.numThreads": 1,
            "druid.server.http.numThreads": 12,
        }

    def _service(self, service: str) -> dict[str, Any]:
        d = self.dir
        if service == "coordinator":
            return {
                "druid.coordinator.asOverlord.enabled": "true",
                "druid.coordinator.asOverlord.overlordService": "druid/overlord",
                # Load segments handed off by tasks (or compacted) within seconds,
                # not minutes: the coordinator sees a published segment at its next
                # metadata poll and assigns it at its next run.
                "druid.coordinator.startDelay": "PT5S",
                "druid.coordinator.period": "PT2S",
                "druid.manager.segments.pollDuration": "PT2S",
                "druid.indexer.queue.startDelay": "PT5S",
                "druid.indexer.runner.type": "httpRemote",
                "druid.indexer.storage.type": "metadata",
            }
        if service == "broker":
            return {
                "druid.broker.http.numConnections": 5,
                "druid.broker.http.maxQueuedBytes": "5MiB",
                "druid.broker.cache.useCache": "false",
                "druid.broker.cache.populateCache": "false",
            }
        if service == "historical":
            return {
                "druid.segmentCache.locations": [
                    {"path": str(d / "segment-cache"), "maxSize": "10GiB"}
                ],
                "druid.historical.cache.useCache": "false",
                "druid.historical.cache.populateCache": "false",
            }
        return {  # indexer
            # A datasource's supervisors (its base and one per rollup) run a task
            # each, two during an early handoff (the publishing task and its
            # successor); two slots to spare for compaction or batch tasks.
            "druid.worker.capacity": 7,
            # A task that has published waits for the historical to load its segments
            # before it ends and frees its slot; it checks every minute by default, so
            # an early handoff (the compaction watcher's) held two slots for a minute.
            "druid.segment.handoff.pollDuration": "PT2S",
            "druid.indexer.task.baseTaskDir": str(d / "task"),
            "druid.indexer.task.restoreTasksOnRestart": "true",
            "druid.indexer.task.gracefulShutdownTimeout": "PT20S",
            "druid.indexer.task.hadoopWorkingPath": str(d / "tmp" / "hadoop"),
            "druid.server.http.numThreads": 40,
        }

    # -- processes ------------------------------------------------------------------------

    def _java(self, role: str, artifacts: Path, classpath: list[Path]) -> list[str]:
        heap, direct = MEMORY[role]
        conf = self.dir / "conf"
        return [
            java_binary(),
            "-server",
            f"-Xms{min(heap, 128)}m",
            f"-Xmx{heap}m",
            f"-XX:MaxDirectMemorySize={direct}m",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            *_JAVA17,
            "-Duser.timezone=UTC",
            "-Dfile.encoding=UTF-8",
            "-Djava.awt.headless=true",
            f"-Djava.io.tmpdir={self.dir / 'tmp'}",
            "-Djava.util.logging.manager=org.apache.logging.log4j.jul.LogManager",
            f"-Dlog4j.configurationFile={conf / 'log4j2.xml'}",
            f"-Dderby.system.home={self.dir / 'metadata'}",
            f"-Dderby.stream.error.file={self.dir / 'derby.log'}",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-cp",
            ":".join([*(str(p) for p in classpath), f"{artifacts}/*"]),
        ]

    def start_role(self, role: str, artifacts: Path) -> ProcessRecord:
        conf = self.dir / "conf"
        if role == "zookeeper":
            argv = self._java(role, artifacts, [])
            argv += ["org.apache.zookeeper.server.ZooKeeperServerMain", str(conf / "zoo.cfg")]
        else:
            argv = self._java(role, artifacts, [conf / "_common", conf / role])
            argv += ["org.apache.druid.cli.Main", "server", role]
        return spawn(argv, self.role_log(role), self.dir)

    # -- readiness ------------------------------------------------------------------------

    def role_answers(self, role: str, timeout_s: float) -> bool:
        port = self.port(role)
        if port is None:
            return False
        try:
            if role == "zookeeper":
                return _ruok(port, timeout_s)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=timeout_s) as http:
                if http.get("/status/health").json() is not True:
                    return False
                return self._serves(role, http, timeout_s)
        except (httpx.HTTPError, OSError, ValueError):
            return False

    def _serves(self, role: str, http: httpx.Client, timeout_s: float) -> bool:
        own = f"127.0.0.1:{self.port(role)}"
        if role == "coordinator":  # it leads both as coordinator and as overlord
            mine = f"http://{own}"
            return all(
                http.get(path).text.strip() == mine
                for path in ("/druid/coordinator/v1/leader", "/druid/indexer/v1/leader")
            )
        if role == "broker":
            got = http.post("/druid/v2/sql", json={"query": "SELECT 1", "resultFormat": "array"})
            return got.status_code == 200 and got.json() == [[1]]
        coordinator = self.url("coordinator")
        assert coordinator is not None
        with httpx.Client(base_url=coordinator, timeout=timeout_s) as lead:
            if role == "historical":
                if http.get("/druid/historical/v1/readiness").status_code != 200:
                    return False
                servers = lead.get("/druid/coordinator/v1/servers", params={"simple": ""}).json()
                return any(s.get("host") == own and s.get("type") == "historical" for s in servers)
            workers = lead.get("/druid/indexer/v1/workers").json()  # indexer
            return any(w.get("worker", {}).get("host") == own for w in workers)

    # -- what Tally needs -----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "broker_url": self.url("broker"),
            "coordinator_url": self.url("coordinator"),
            "overlord_url": self.url("coordinator"),
            "version": pinned_version(),
        }

    def env(self) -> dict[str, str]:
        broker, coordinator = self.url("broker"), self.url("coordinator")
        if broker is None or coordinator is None:
            return {}
        return {
            "TALLY_STORE__BACKEND": "druid",
            "TALLY_DRUID__BROKER_URL": broker,
            "TALLY_DRUID__COORDINATOR_URL": coordinator,
            "TALLY_DRUID__OVERLORD_URL": coordinator,
        }


def _ruok(port: int, timeout_s: float) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        conn.sendall(b"ruok")
        return conn.recv(16) == b"imok"


ENGINE = DruidEngine
