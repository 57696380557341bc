"""Rows into a real Druid without Kafka: a native batch task over inline refined rows,
with the supervisor's own dataSchema (so the datasource is typed as the supervisor
would type it). Reader tests load this way; the Kafka path has its own test.
Rollups get the deltas the relay would produce (``storage.keystate``), batch by
batch, through their own supervisors' dataSchemas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from storage.druid.compactor import inline_task
from storage.druid.supervisor import (
    datasource_name,
    rollup_datasource_name,
    rollup_supervisor_spec,
    supervisor_spec,
)
from storage.keystate import KeyStates
from storage.refined import RowEncoder, encode_deltas
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
    _index(druid, schema, values)
    want = before + len(rows)
    poll(lambda: druid.count(name) == want or None, 120, f"{name}: {want} rows not served")
    return name


def load_rollups(
    druid: Druid,
    settings: Settings,
    spec: DatasourceSpec,
    batches: Sequence[Sequence[Mapping[str, Any]]],
) -> None:
    """Each rollup's deltas for ``batches``, planned batch by batch as the relay
    plans them; wait until the counts add up."""
    states = KeyStates(spec)
    deltas: dict[str, list[list[bytes]]] = {r.name: [] for r in spec.rollups}
    for batch in batches:
        table = rows_to_table(list(batch), row_schema(spec))
        plan = states.plan(table, [0] * table.num_rows)
        states.apply(plan)
        for rollup in spec.rollups:
            if (rows := plan.deltas.get(rollup.name)) is not None:
                deltas[rollup.name].append(encode_deltas(spec, rollup, rows))
    keys = len(states)
    for rollup in spec.rollups:
        schema = rollup_supervisor_spec(settings, spec, rollup)["spec"]["dataSchema"]
        # One task for all batches' deltas (a task costs seconds): a group's deltas
        # of two batches are still two rows, which Druid rolls up or the query sums.
        _index(druid, schema, [v for values in deltas[rollup.name] for v in values])
        name = rollup_datasource_name(settings, rollup)

        def served(name: str = name) -> bool | None:
            return _summed_count(druid, name) == keys or None

        poll(served, 120, f"{name}: the deltas of {keys} keys not served")


def _summed_count(druid: Druid, datasource: str) -> int | None:
    try:
        rows = druid.sql(f'SELECT SUM("count") FROM "{datasource}"')
    except httpx.HTTPStatusError:
        return None
    return None if rows[0][0] is None else int(rows[0][0])


def _index(druid: Druid, schema: dict[str, Any], values: Sequence[bytes]) -> None:
    status = druid.wait_task(druid.submit_task(inline_task(schema, values)))
    assert status["status"] == "SUCCESS", status
