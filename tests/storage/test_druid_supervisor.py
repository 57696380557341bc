"""Druid supervisor specs generated from the datasource spec, and ``tally druid``."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import SecretStr

from storage import backend
from storage.druid.supervisor import contains, rollup_supervisor_spec, supervisor_spec, supervisors
from storage.refined import refined_topic
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tests.brokers import free_port
from tests.cli import tally

DRUID_TYPES = {"string": "string", "int": "long", "timestamp": "long", "bool": "long"}


def test_the_payments_supervisor_types_every_column_and_keeps_late_events(
    payments_spec: DatasourceSpec,
) -> None:
    settings = Settings(topic_namespace="stage.")
    sup = supervisor_spec(settings, payments_spec)
    assert sup["type"] == "kafka"
    schema, io, tuning = (sup["spec"][k] for k in ("dataSchema", "ioConfig", "tuningConfig"))
    ds = payments_spec.datasource
    assert schema["dataSource"] == "stage.payments"
    assert schema["timestampSpec"] == {"column": ds.time, "format": "millis"}
    dims = {d["name"]: d["type"] for d in schema["dimensionsSpec"]["dimensions"]}
    want = {n: DRUID_TYPES[c.type] for n, c in payments_spec.columns.items() if n != ds.time}
    assert dims == want  # every other column, typed (money and versions are longs)
    assert dims["amount"] == "long" and dims["merchant_id"] == "string"
    gran = schema["granularitySpec"]
    assert gran["segmentGranularity"] == ds.granularity.upper() == "DAY"
    assert gran["queryGranularity"] == "NONE" and gran["rollup"] is False
    assert schema["metricsSpec"] == []
    assert io["topic"] == refined_topic(settings, payments_spec) == "stage.payments.v1.refined"
    assert io["consumerProperties"]["isolation.level"] == "read_committed"
    assert io["consumerProperties"]["bootstrap.servers"] == settings.kafka_bootstrap
    assert io["useEarliestOffset"] is True and io["inputFormat"] == {"type": "json"}
    assert io["taskCount"] == io["replicas"] == 1
    assert tuning["type"] == "kafka" and tuning["maxRowsInMemory"] <= 100_000
    text = json.dumps(sup)
    assert "RejectionPeriod" not in text and "RejectionStartDateTime" not in text


def test_segment_granularity_follows_the_spec(payments_spec: DatasourceSpec) -> None:
    hourly = payments_spec.model_copy(
        update={"datasource": payments_spec.datasource.model_copy(update={"granularity": "hour"})}
    )
    gran = supervisor_spec(Settings(), hourly)["spec"]["dataSchema"]["granularitySpec"]
    assert gran["segmentGranularity"] == "HOUR"


def test_the_kafka_password_reaches_druid_but_is_never_printed(
    payments_spec: DatasourceSpec,
) -> None:
    settings = Settings(kafka_user="tally", kafka_password=SecretStr("s3cret"))
    shown = supervisor_spec(settings, payments_spec, secrets=False)
    sent = supervisor_spec(settings, payments_spec)
    assert "s3cret" not in json.dumps(shown) and "<redacted>" in json.dumps(shown)
    props = sent["spec"]["ioConfig"]["consumerProperties"]
    assert 'password="s3cret"' in props["sasl.jaas.config"]
    assert props["security.protocol"] == "SASL_PLAINTEXT"


def test_a_spec_druid_holds_with_its_defaults_counts_as_unchanged(
    payments_spec: DatasourceSpec,
) -> None:
    wanted = supervisor_spec(Settings(), payments_spec)
    held = json.loads(json.dumps(wanted))  # what Druid returns: ours plus its defaults
    held["suspended"] = False
    for dim in held["spec"]["dataSchema"]["dimensionsSpec"]["dimensions"]:
        dim |= {"multiValueHandling": "SORTED_ARRAY", "createBitmapIndex": True}
    held["spec"]["tuningConfig"]["maxPendingPersists"] = 0
    held["spec"]["ioConfig"]["inputFormat"]["keepNullColumns"] = False
    assert contains(held, wanted)
    held["spec"]["ioConfig"]["topic"] = "other"
    assert not contains(held, wanted)
    held["spec"]["ioConfig"]["topic"] = wanted["spec"]["ioConfig"]["topic"]
    held["spec"]["dataSchema"]["dimensionsSpec"]["dimensions"].pop()
    assert not contains(held, wanted)  # a column missing is a change


def test_each_rollup_sums_its_signed_deltas_with_rollup_on(payments_spec: DatasourceSpec) -> None:
    """Druid's own row count would count delta rows, not payments: the count is a
    longSum of the signed count like every other metric, and nothing is re-bucketed
    by Druid (the deltas carry their bucket in the spec's zone)."""
    settings = Settings(topic_namespace="t.")
    for rollup in payments_spec.rollups:
        body = rollup_supervisor_spec(settings, payments_spec, rollup)["spec"]
        schema = body["dataSchema"]
        assert schema["dataSource"] == f"t.{rollup.name}"
        assert schema["timestampSpec"] == {"column": "bucket", "format": "millis"}
        assert [d["name"] for d in schema["dimensionsSpec"]["dimensions"]] == list(
            rollup.dimensions
        )
        assert schema["metricsSpec"] == [
            {"type": "longSum", "name": m.name, "fieldName": m.name}
            for m in payments_spec.parsed_metrics
        ]
        assert "count" in {m["name"] for m in schema["metricsSpec"]}
        assert schema["granularitySpec"]["rollup"] is True
        assert schema["granularitySpec"]["queryGranularity"] == "NONE"
        assert body["ioConfig"]["topic"] == f"t.payments.v1.refined.{rollup.name}"
        assert body["ioConfig"]["consumerProperties"]["isolation.level"] == "read_committed"
    ids = list(supervisors(settings, payments_spec))
    assert ids == ["t.payments", *(f"t.{r.name}" for r in payments_spec.rollups)]
    # APPEND locks for every supervisor: the watcher's compactions run beside them.
    assert all(
        b["context"] == {"useConcurrentLocks": True}
        for b in supervisors(settings, payments_spec).values()
    )


def test_druid_capabilities_pick_kafka_ingestion() -> None:
    caps = backend("druid").capabilities
    assert caps.name == "druid" and caps.sql_dialect == "tallydruid"  # storage.druid.dialect
    assert caps.ingests_from_kafka and caps.manual_compaction and caps.compacts_in_engine
    assert not caps.partial_compaction  # a Druid compaction replaces a whole time chunk
    assert not caps.visible_on_commit and not caps.dead_letter_outbox and not caps.repair
    assert not caps.transactional_offsets and not caps.packs and not caps.resident_rollups
    assert not backend("embedded").capabilities.ingests_from_kafka


def test_tally_druid_specs_prints_what_apply_would_submit(
    payments_spec: DatasourceSpec, data_dir: Path
) -> None:
    env = {"TALLY_TOPIC_NAMESPACE": "ci.", "TALLY_KAFKA_BOOTSTRAP": "kafka:9092"}
    ran = tally("druid", "specs", "--format", "json", data_dir=data_dir, env=env)
    assert ran.code == 0, ran.err
    settings = Settings(topic_namespace="ci.", kafka_bootstrap="kafka:9092")
    assert ran.json() == {"supervisors": list(supervisors(settings, payments_spec).values())}


def test_tally_druid_apply_without_a_reachable_overlord_says_so_in_one_line(
    data_dir: Path,
) -> None:
    unset = tally("druid", "apply", data_dir=data_dir, env={"TALLY_DRUID__OVERLORD_URL": ""})
    assert unset.code == 2 and unset.out == ""
    assert unset.err.count("\n") == 1 and "druid.overlord_url is not set" in unset.err
    url = f"http://127.0.0.1:{free_port()}"
    down = tally("druid", "apply", data_dir=data_dir, env={"TALLY_DRUID__OVERLORD_URL": url})
    assert down.code == 2 and down.out == ""
    assert down.err.count("\n") == 1 and down.err.startswith(f"error: Druid overlord at {url}")
