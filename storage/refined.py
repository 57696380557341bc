"""The refined topic: decoded, validated rows as flat JSON, for engines that ingest
from Kafka themselves (``Capabilities.ingests_from_kafka``, e.g. Druid).

Tally's relay sink writes it and the engine's own consumer reads it, so the format is
defined once, here, for both sides (ADR 0004):

* one message per valid event, on the same partition number as its source message
  (per-key order holds), keyed by the datasource key;
* the value is one JSON object with every spec column; timestamps are epoch
  milliseconds (UTC, no zone to get wrong), money and counts integers, booleans 0/1,
  nulls null — every value of a ``long`` column is an integer;
* header ``tally.offset``: the source message's offset (lineage, and how tests prove
  exactly-once per source message).

Rollups (ADR 0006) add one topic of deltas per rollup (bucket start in epoch millis,
dimensions, one signed integer per metric; the engine sums them) and the relay's
per-key state changelog (``storage.keystate``).
"""

from __future__ import annotations

from typing import Literal

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from storage.deltas import BUCKET
from tally.settings import Settings
from tally.specs import DatasourceSpec, Rollup

Kind = Literal["string", "long"]
TIME_FORMAT = "millis"  # how timestamp columns are written (Druid's timestampSpec format)
OFFSET_HEADER = "tally.offset"
_KINDS: dict[str, Kind] = {"string": "string", "int": "long", "timestamp": "long", "bool": "long"}


def refined_topic(settings: Settings, spec: DatasourceSpec) -> str:
    return settings.topic(spec.datasource.topic + settings.druid.refined_topic_suffix)


def rollup_topic(settings: Settings, spec: DatasourceSpec, rollup: Rollup) -> str:
    """The deltas of one rollup (``storage.keystate``), which the engine sums."""
    return f"{refined_topic(settings, spec)}.{rollup.name}"


def state_topic(settings: Settings, spec: DatasourceSpec) -> str:
    """The relay's per-key state changelog: compacted, partitioned as the source."""
    return f"{refined_topic(settings, spec)}.state"


def rollup_kinds(spec: DatasourceSpec, rollup: Rollup) -> dict[str, Kind]:
    """A delta row's columns and kinds: bucket (epoch millis), dimensions, metrics."""
    kinds: dict[str, Kind] = {BUCKET: "long"}
    kinds |= {d: _KINDS[spec.columns[d].type] for d in rollup.dimensions}
    kinds |= {m.name: "long" for m in spec.parsed_metrics}
    return kinds


def encode_deltas(spec: DatasourceSpec, rollup: Rollup, deltas: pa.Table) -> list[bytes]:
    """``signed_deltas`` rows → one flat JSON object each, in the refined format."""
    names = list(rollup_kinds(spec, rollup))
    columns = []
    for name in names:
        col = deltas.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("ms", tz="UTC"), safe=False).cast(pa.int64())
        elif pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.int8())
        columns.append(col.to_pylist())
    dumps = orjson.dumps
    return [dumps(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]


def column_kinds(spec: DatasourceSpec) -> dict[str, Kind]:
    """Each spec column's JSON kind in the refined row, in spec order."""
    return {name: _KINDS[col.type] for name, col in spec.columns.items()}


class RowEncoder:
    """Decoded Arrow rows → refined-topic values (one flat JSON object per row)."""

    def __init__(self, spec: DatasourceSpec) -> None:
        self.names = list(spec.columns)
        self.types = {n: c.type for n, c in spec.columns.items()}
        self.key = spec.datasource.key
        column_kinds(spec)  # the format's one definition: every spec type has a kind

    def encode(self, table: pa.Table) -> tuple[list[bytes], list[bytes]]:
        columns = []
        for name in self.names:
            col = table.column(name)
            if self.types[name] == "timestamp":
                col = col.cast(pa.timestamp("ms", tz="UTC"), safe=False).cast(pa.int64())
            elif self.types[name] == "bool":
                col = pc.cast(col, pa.int8())
            columns.append(col.to_pylist())
        names = self.names
        dumps = orjson.dumps
        values = [dumps(dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
        keys = [k.encode() for k in table.column(self.key).to_pylist()]
        return keys, values
