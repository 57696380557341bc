"""Druid Kafka supervisor specs, generated from a datasource spec (never hand-written).

The supervisor reads the refined topic the relay writes (``storage.refined``: flat,
typed, validated rows), never the raw events topic (ADR 0004). What the spec fixes:

* the partition-time column is the primary timestamp (``__time``), epoch millis; every
  other column is a typed dimension (string, or long for ints, timestamps in millis,
  booleans 0/1), so Druid neither guesses types nor drops a column;
* ``segmentGranularity`` is the spec's partition granularity as a simple (UTC)
  granularity: Kafka ingestion allocates segments by simple granularities only, a
  zoned period is ignored or fails (apache/druid#8690, #11179), so one calendar day of
  a non-UTC datasource spans two UTC chunks, and compaction of a late day covers both;
* no rollup on the base (merge on read needs every version), queryGranularity none;
* no ``lateMessageRejectionPeriod`` / ``earlyMessageRejectionPeriod``: a cancellation
  30 days after its payment must still land in its partition;
* read_committed: what an aborted relay transaction held is never ingested;
* one task, one replica, small in-memory limits: sized for a 2-core machine.

Each rollup has a supervisor of its own (``rollup_supervisor_spec``): it ingests the
rollup's deltas topic with rollup on and longSum metrics (ADR 0006).

The supervisor id is the Druid datasource name, the datasource name behind the
settings' topic namespace (so test runs and stages can share one Druid).
"""

from __future__ import annotations

import re
from typing import Any

from storage.deltas import BUCKET
from storage.refined import TIME_FORMAT, column_kinds, refined_topic, rollup_kinds, rollup_topic
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup

REDACTED = "<redacted>"


def datasource_name(settings: Settings, spec: DatasourceSpec) -> str:
    return f"{settings.topic_namespace}{spec.name}"


def rollup_datasource_name(settings: Settings, rollup: Rollup) -> str:
    return f"{settings.topic_namespace}{rollup.name}"


def consumer_properties(settings: Settings, *, secrets: bool) -> dict[str, Any]:
    props: dict[str, Any] = {
        "bootstrap.servers": settings.druid.kafka_bootstrap or settings.kafka_bootstrap,
        "isolation.level": "read_committed",
    }
    if settings.kafka_password is not None:
        password = settings.kafka_password.get_secret_value() if secrets else REDACTED
        user = settings.kafka_user or "tally"
        props |= {
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{user}" password="{password}";'
            ),
        }
    return props


def supervisor_spec(
    settings: Settings, spec: DatasourceSpec, *, secrets: bool = True
) -> dict[str, Any]:
    """The body of ``POST /druid/indexer/v1/supervisor`` for ``spec``'s base datasource
    (``secrets=False``: the Kafka password redacted, for printing)."""
    ds = spec.datasource
    dimensions = [
        {"type": kind, "name": name} for name, kind in column_kinds(spec).items() if name != ds.time
    ]
    schema = {
        "dataSource": datasource_name(settings, spec),
        "timestampSpec": {"column": ds.time, "format": TIME_FORMAT},
        "dimensionsSpec": {"dimensions": dimensions},
        "metricsSpec": [],
        "granularitySpec": {
            "type": "uniform",
            "segmentGranularity": ds.granularity.upper(),
            "queryGranularity": "NONE",
            "rollup": False,
        },
    }
    topic = refined_topic(settings, spec)
    return _kafka_supervisor(settings, schema, topic, secrets=secrets, memory=64 * 1024 * 1024)


def rollup_supervisor_spec(
    settings: Settings, spec: DatasourceSpec, rollup: Rollup, *, secrets: bool = True
) -> dict[str, Any]:
    """The supervisor of one rollup's datasource: it ingests the rollup's deltas
    (``storage.keystate``) with rollup on, every metric a ``longSum`` of the signed
    deltas (the count too: Druid's row count would count deltas, not payments), the
    bucket start as the timestamp. A delta row is already bucketed in the spec's zone,
    so queryGranularity is none and Druid only combines rows of one bucket."""
    kinds = rollup_kinds(spec, rollup)
    metrics = [m.name for m in spec.parsed_metrics]
    schema = {
        "dataSource": rollup_datasource_name(settings, rollup),
        "timestampSpec": {"column": BUCKET, "format": TIME_FORMAT},
        "dimensionsSpec": {
            "dimensions": [{"type": kinds[d], "name": d} for d in rollup.dimensions]
        },
        "metricsSpec": [{"type": "longSum", "name": m, "fieldName": m} for m in metrics],
        "granularitySpec": {
            "type": "uniform",
            "segmentGranularity": rollup.partition.upper(),
            "queryGranularity": "NONE",
            "rollup": True,
        },
    }
    topic = rollup_topic(settings, spec, rollup)
    # Deltas are few and small (one row per touched group and batch).
    return _kafka_supervisor(settings, schema, topic, secrets=secrets, memory=16 * 1024 * 1024)


def supervisors(
    settings: Settings, spec: DatasourceSpec, *, secrets: bool = True
) -> dict[str, dict[str, Any]]:
    """Every supervisor of ``spec`` by id: the base datasource's, then each rollup's."""
    out = {datasource_name(settings, spec): supervisor_spec(settings, spec, secrets=secrets)}
    for rollup in spec.rollups:
        body = rollup_supervisor_spec(settings, spec, rollup, secrets=secrets)
        out[rollup_datasource_name(settings, rollup)] = body
    return out


def _kafka_supervisor(
    settings: Settings, schema: dict[str, Any], topic: str, *, secrets: bool, memory: int
) -> dict[str, Any]:
    return {
        "type": "kafka",
        # APPEND locks: the watcher's compactions (REPLACE locks) run beside ingestion
        # and neither revokes the other (storage.druid.compactor).
        "context": {"useConcurrentLocks": True},
        "spec": {
            "dataSchema": schema,
            "ioConfig": {
                "type": "kafka",
                "topic": topic,
                "inputFormat": {"type": "json"},
                "consumerProperties": consumer_properties(settings, secrets=secrets),
                "useEarliestOffset": True,
                "taskCount": 1,
                "replicas": 1,
                "taskDuration": "PT1H",
                "completionTimeout": "PT30M",
                # The supervisor acts on an early handoff (the compaction watcher's)
                # at its next run: every 5 s, not Druid's default 30 s.
                "period": "PT5S",
                "pollTimeout": 100,
            },
            "tuningConfig": {
                "type": "kafka",
                "maxRowsInMemory": 100_000,
                "maxBytesInMemory": memory,
                "maxRowsPerSegment": 5_000_000,
                "intermediatePersistPeriod": "PT1M",
                "maxPendingPersists": 0,
                "resetOffsetAutomatically": False,
                # Read positions and lag in the supervisor's status (what `tally verify`
                # and the API's figures read) every 5 s, Druid's minimum, not 30 s.
                "offsetFetchPeriod": "PT5S",
                # Every row was validated by the relay: a parse exception is a bug in
                # the format, logged and counted rather than stopping the partition.
                "logParseExceptions": True,
                "maxSavedParseExceptions": 100,
            },
        },
    }


def contains(actual: Any, wanted: Any) -> bool:
    """Whether Druid's copy of a spec holds everything ``wanted`` says. Druid returns
    what it stored with its defaults filled in (more keys, dimension objects with
    their index options), so equality would always differ; a subset does not. Druid
    33 also echoes some values in another form (measured): durations in seconds
    (``PT1H`` as ``PT3600S``), a granularity name as an object (``NONE`` as
    ``{"type": "none"}``), and the ioConfig without its ``type``; those count as equal."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(
            (k in actual and contains(actual[k], v)) or (k == "type" and k not in actual)
            for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(wanted)
            and all(contains(a, w) for a, w in zip(actual, wanted, strict=True))
        )
    if isinstance(wanted, str) and isinstance(actual, dict):
        return set(actual) == {"type"} and str(actual["type"]).lower() == wanted.lower()
    if isinstance(wanted, str) and isinstance(actual, str) and wanted != actual:
        a, w = _seconds(actual), _seconds(wanted)
        return a is not None and a == w
    return bool(actual == wanted)


_DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?$")


def _seconds(text: str) -> int | None:
    """Seconds of an ISO 8601 time duration (``PT1H30M``), None if it is not one."""
    match = _DURATION.match(text)
    if match is None or not any(match.groups()):
        return None
    h, m, sec = (int(g or 0) for g in match.groups())
    return h * 3600 + m * 60 + sec
