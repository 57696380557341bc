"""Relay throughput (ADR 0004): events/s from the events topic into the refined and
dead-letter topics, one ``tally ingest --sink olap`` process on the Druid backend,
through a running Apache Kafka (the relay needs its transactions):

    tally engines up kafka            # prints the bootstrap address
    python bench/relay.py --bootstrap 127.0.0.1:PORT [--events 200000]

Everything is published first; the rate is timed from the relay's first commit to the
one that covers the last message (the group's committed offsets, which the relay moves
only inside its transactions). No Druid is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ingest.kafka import base_config, ensure_topics  # noqa: E402
from producers.generate import GeneratorConfig, generate_events  # noqa: E402
from producers.malformed import with_malformed  # noqa: E402
from producers.publish import Publisher  # noqa: E402
from tally.settings import Settings, StoreSettings  # noqa: E402
from tally.specs import SpecRegistry, builtin_spec_paths  # noqa: E402


def committed(probe: Consumer, topic: str, parts: list[int]) -> int | None:
    try:
        got = probe.committed([TopicPartition(topic, p) for p in parts], timeout=10)
    except KafkaException:
        return None  # the coordinator is moving or loading: ask again
    return sum(max(0, tp.offset) for tp in got)


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--bootstrap", required=True)
    args.add_argument("--events", type=int, default=200_000)
    opts = args.parse_args()
    data = Path(tempfile.mkdtemp(prefix="tally-relay-bench-"))
    settings = Settings(
        data_dir=data,
        kafka_bootstrap=opts.bootstrap,
        topic_namespace=f"r{uuid.uuid4().hex[:8]}.",
        store=StoreSettings(backend="druid"),
    )
    registry = SpecRegistry.load(builtin_spec_paths())
    ensure_topics(settings, registry)
    topic = settings.topic("payments.v1")
    config = GeneratorConfig(transactions=opts.events, merchants=50, days=30, seed=1)
    wires = list(with_malformed(generate_events(config), 0.002, 1))[: opts.events]
    pub = Publisher(settings, topic)
    pub.send(wires)
    total, parts = sum(pub.ends.values()), sorted(pub.ends)
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(data),
        "TALLY_KAFKA_BOOTSTRAP": opts.bootstrap,
        "TALLY_TOPIC_NAMESPACE": settings.topic_namespace,
        "TALLY_STORE__BACKEND": "druid",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tally", "ingest", "--sink", "olap"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    group = settings.group("olap", "payments")
    probe = Consumer(
        base_config(settings) | {"group.id": group, "isolation.level": "read_uncommitted"}
    )
    first: tuple[float, int] | None = None
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            n = committed(probe, topic, parts)
            now = time.monotonic()
            if n and first is None:
                first = (now, n)
            if n is not None and n >= total:
                break
            time.sleep(0.05)
        else:
            raise SystemExit(f"the relay did not commit all {total:,} messages")
    finally:
        probe.close()
        proc.terminate()
        proc.wait(60)
    assert first is not None
    rate = (total - first[1]) / max(1e-9, now - first[0])
    print(json.dumps({"events": total, "relay_events_per_s": round(rate)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
