"""Rows into a real Druid without Kafka: a native batch task over inline refined rows,
with the supervisor's own dataSchema (so the datasource is typed as the supervisor
would type it). Reader tests load this way; the Kafka path has its own test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from storage.druid.supervisor import datasource_name, supervisor_spec
from storage.refined import RowEncoder
from storage.schema import row_schema, rows_to_table
from tally.settings import Settings
from tally.specs import DatasourceSpec
from tests.druid import Druid, poll


def load(
    druid: Druid, settings: Settings, spec: DatasourceSpec, rows: Sequence[Mapping[str, Any]]
) -> str:
    """Append ``rows`` (spec-typed dicts) to the datasource; wait until all are served."""
    name = datasource_name(settings, spec)
    before = druid.count(name) or 0
    _keys, values = RowEncoder(spec).encode(rows_to_table(list(rows), row_schema(spec)))
    schema = supervisor_spec(settings, spec)["spec"]["dataSchema"]
    task = {
        "type": "index_parallel",
        "spec": {
            "dataSchema": schema,
            "ioConfig": {
                "type": "index_parallel",
                "inputSource": {"type": "inline", "data": b"\n".join(values).decode()},
                "inputFormat": {"type": "json"},
                "appendToExisting": True,
            },
            "tuningConfig": {"type": "index_parallel", "maxNumConcurrentSubTasks": 1},
        },
    }
    status = druid.wait_task(druid.submit_task(task))
    assert status["status"] == "SUCCESS", status
    want = before + len(rows)
    poll(lambda: druid.count(name) == want or None, 120, f"{name}: {want} rows not served")
    return name
