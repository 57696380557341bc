"""A sink's share of the events (``[sinks.<name>]`` in the spec): the batch narrowed
to the keys in its sample that pass its filter, before the sink writes it.

What is skipped is counted (``tally_ingest_selected_total{outcome}``), never dead-
lettered: it is valid data this sink was told not to keep. Offsets still cover the
whole batch, so a skipped event is never read again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset

from ingest.decode import Decoded
from tally.specs import DatasourceSpec
from tally.specs.selection import compile_filter, parse_filter, sample_mask


@dataclass(frozen=True)
class Selected:
    decoded: Decoded
    kept: int
    out_of_sample: int
    filtered: int


class Selector:
    def __init__(self, spec: DatasourceSpec, sink: str) -> None:
        chosen = spec.selection(sink)
        self.everything = chosen.everything
        self.share = chosen.sample
        self.key = spec.datasource.key
        types = {c: v.type for c, v in spec.columns.items()}
        self.predicate = (
            compile_filter(parse_filter(chosen.filter, types))
            if chosen.filter is not None
            else None
        )

    def apply(self, decoded: Decoded) -> Selected:
        table = decoded.table
        if self.everything or not table.num_rows:
            return Selected(decoded, table.num_rows, 0, 0)
        sampled = sample_mask(table.column(self.key), self.share)
        mask = sampled
        if self.predicate is not None:
            # SQL's unknown (a comparison with a null) is not kept
            passes = pc.fill_null(_evaluate(table, self.predicate), False)
            mask = pc.and_(sampled, passes)
        keep = mask.to_pylist()
        kept = sum(keep)
        out_of_sample = table.num_rows - sum(sampled.to_pylist())
        narrowed = replace(
            decoded,
            table=table.filter(mask),
            partitions=[p for p, k in zip(decoded.partitions, keep, strict=False) if k],
            offsets=[o for o, k in zip(decoded.offsets, keep, strict=False) if k],
        )
        return Selected(narrowed, kept, out_of_sample, table.num_rows - kept - out_of_sample)


def _evaluate(table: pa.Table, predicate: pc.Expression) -> pa.Array:
    """``predicate`` per row of ``table`` (a projection, not a filter: one value a row)."""
    projected = pa_dataset.dataset(table).to_table(columns={"keep": predicate})
    return projected.column("keep").combine_chunks()
