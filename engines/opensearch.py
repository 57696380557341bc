"""OpenSearch 2.19 on loopback: one node, from Maven Central jars and a small launcher.

Why this way (see docs/adr/0010-opensearch-from-maven-central.md):

- **Jars, not the tarball.** Maven Central publishes ``org.opensearch:opensearch`` and
  each module as a plugin jar, not the distribution. The stock bootstrap loads modules
  from the tarball's ``modules/`` directory, so ``engines/java/TallyOpenSearchNode.java``
  constructs a ``Node`` with the module plugins (HTTP transport, common analysis,
  mapper extras, painless) as classpath classes, as OpenSearch's own MockNode does. Its
  header says what that skips: the security manager, the bootstrap checks, JNA, the
  keystore, the other modules.
- **2.19.x**: the newest line that runs on Java 17 (3.x needs Java 21).
- The launcher is compiled once per pin with the machine's ``javac`` into the artifact
  cache, beside the jars.

Ports (HTTP, transport) are chosen free on the first start and kept in ``state.json``
with a cluster name unique to this data dir; a restart comes back on them with its
data. Everything binds 127.0.0.1; ``discovery.type: single-node``; the disk-watermark
checks are off (a full development disk must not turn indices read-only mid-test).
Readiness is ``GET /_cluster/health`` answering with this cluster's name and a status
of at least yellow.
"""

from __future__ import annotations

import hashlib
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from engines import maven
from engines.base import Engine, file_lock, free_loopback_ports, java_binary
from engines.process import ProcessRecord, spawn
from tally.errors import EngineError, EngineUnavailable

HEAP = ["-Xms256m", "-Xmx768m"]
LAUNCHER = Path(__file__).parent / "java" / "TallyOpenSearchNode.java"
MAIN = "TallyOpenSearchNode"

_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d{ISO8601}] %-5p %c{1.} %m%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
logger.deprecation.name = org.opensearch.deprecation
logger.deprecation.level = error
"""


def pinned_version() -> str:
    """OpenSearch's version as pinned in the engine's pom (the one source of truth)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    root = ET.parse(maven.pom_path("opensearch")).getroot()
    return root.findtext("m:properties/m:opensearch.version", default="?", namespaces=ns)


def node_config(cluster: str, http_port: int, transport_port: int, home: Path) -> str:
    settings = {
        "cluster.name": cluster,
        "node.name": "tally-local",
        "path.home": str(home),
        "path.data": str(home / "data"),
        "path.logs": str(home / "logs"),
        "network.host": "127.0.0.1",
        "http.port": str(http_port),
        "transport.port": str(transport_port),
        "discovery.type": "single-node",
        "cluster.routing.allocation.disk.threshold_enabled": "false",
        "bootstrap.memory_lock": "false",
        # Tally creates its indices with explicit mappings; a write naming another
        # index must fail, not create one with dynamic mappings.
        "action.auto_create_index": "false",
    }
    return "".join(f'{k}: "{v}"\n' for k, v in settings.items())


class OpenSearchEngine(Engine):
    name = "opensearch"
    start_timeout_s = 120.0

    @property
    def url(self) -> str | None:
        port = self.state().get("ports", {}).get("http")
        return f"http://127.0.0.1:{port}" if port else None

    def resolve(self) -> Path:
        lib = maven.resolve(self.name, self.home)
        self._compile(lib)
        return lib

    def _classes(self, lib: Path) -> Path:
        digest = hashlib.sha256(LAUNCHER.read_bytes()).hexdigest()[:16]
        return lib.parent / f"launcher-{digest}"

    def _compile(self, lib: Path) -> None:
        """Compile the launcher against the resolved jars, once per source and pin."""
        classes = self._classes(lib)
        if (classes / f"{MAIN}.class").exists():
            return
        javac = Path(java_binary()).with_name("javac")
        if not javac.exists():
            raise EngineUnavailable(f"javac not found beside {java_binary()} (a JDK is needed)")
        with file_lock(lib.parent / ".launcher.lock"):
            if (classes / f"{MAIN}.class").exists():
                return
            partial = classes.with_name(classes.name + ".partial")
            partial.mkdir(parents=True, exist_ok=True)
            ran = subprocess.run(
                [str(javac), "-d", str(partial), "-cp", f"{lib}/*", str(LAUNCHER)],
                capture_output=True,
                text=True,
                check=False,
            )
            if ran.returncode != 0:
                first = (ran.stderr or ran.stdout).strip().splitlines()[:1]
                raise EngineError(f"the OpenSearch launcher did not compile: {' '.join(first)}")
            partial.replace(classes)

    def _configure(self) -> dict[str, Any]:
        """First start: choose ports and a cluster name; later starts reuse them."""
        doc = self.state()
        if "ports" not in doc:
            http, transport = free_loopback_ports(2)
            doc = {"ports": {"http": http, "transport": transport}}
            doc["cluster"] = f"tally-{uuid.uuid4().hex[:12]}"
            self.save_state(doc)
        ports = doc["ports"]
        self.require_free(ports)
        config = self.dir / "config"
        config.mkdir(parents=True, exist_ok=True)
        (config / "opensearch.yml").write_text(
            node_config(doc["cluster"], int(ports["http"]), int(ports["transport"]), self.dir)
        )
        (config / "log4j2.properties").write_text(_LOG4J)
        return doc

    def start(self, artifacts: Path) -> ProcessRecord:
        self._configure()
        config = self.dir / "config"
        cmd = [
            java_binary(),
            *HEAP,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            "-Dfile.encoding=UTF-8",
            "-Dlog4j2.disable.jmx=true",
            f"-Dlog4j2.configurationFile={config / 'log4j2.properties'}",
            "-cp",
            f"{artifacts}/*:{self._classes(artifacts)}",
            MAIN,
            str(config),
        ]
        return spawn(cmd, self.log, self.dir)

    def answers(self, timeout_s: float) -> bool:
        url = self.url
        if url is None:
            return False
        try:
            resp = httpx.get(f"{url}/_cluster/health", timeout=timeout_s)
            doc = resp.json()
        except (httpx.HTTPError, ValueError):
            return False
        return (
            resp.status_code == 200
            and doc.get("cluster_name") == self.state().get("cluster")
            and doc.get("status") in ("green", "yellow")
        )

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "version": pinned_version()}

    def env(self) -> dict[str, str]:
        url = self.url
        if url is None:
            return {}
        return {"TALLY_SEARCH__BACKEND": "opensearch", "TALLY_SEARCH__URL": url}


ENGINE = OpenSearchEngine
