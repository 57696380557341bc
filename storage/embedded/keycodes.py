"""How the key index stores each column of a key's state in a few bytes.

A key's state (``spec.rollup_state_columns``: what a replaced row must retract from
the rollups) is kept column by column in NumPy arrays: times as epoch microseconds,
integers as int64 with a validity array only where the column is nullable, booleans
as one byte, strings as codes into a per-column dictionary. The tenant column shares
the tenant's codes, so it costs nothing twice. A dictionary starts with 1-byte codes
and widens (2, then 4 bytes) as values arrive: payments' method, status and currency
take a byte each, merchants four.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from tally.specs import DatasourceSpec

Kind = Literal["time", "tenant", "code", "int", "bool"]
Array = npt.NDArray[Any]
_TS = pa.timestamp("us", tz="UTC")
_WIDTHS = (np.uint8, np.uint16, np.uint32)


@dataclass
class Codes:
    """Values ↔ small integer codes; code 0 is null."""

    values: list[Any] = field(default_factory=lambda: [None])
    index: dict[Any, int] = field(default_factory=dict)

    @property
    def dtype(self) -> type[np.unsignedinteger[Any]]:
        return next(w for w in _WIDTHS if len(self.values) <= np.iinfo(w).max + 1)

    def encode(self, array: pa.Array | pa.ChunkedArray) -> Array:
        """Codes of ``array``'s values, new values added (only the distinct ones are
        touched in Python)."""
        encoded = pc.dictionary_encode(array)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks() if encoded.num_chunks else pa.array([], pa.string())
            if not isinstance(encoded, pa.DictionaryArray):
                encoded = pc.dictionary_encode(encoded)
        mapping = np.empty(len(encoded.dictionary) + 1, np.uint32)
        mapping[-1] = 0  # nulls index the extra slot
        for i, value in enumerate(encoded.dictionary.to_pylist()):
            code = self.index.get(value)
            if code is None:
                code = self.index[value] = len(self.values)
                self.values.append(value)
            mapping[i] = code
        indices = encoded.indices.fill_null(len(encoded.dictionary))
        return mapping[np.asarray(indices, dtype=np.int64)]

    def decode(self, codes: Array, type_: pa.DataType) -> pa.Array:
        return pa.array(self.values, type_).take(pa.array(codes.astype(np.int64)))


@dataclass(frozen=True)
class StateColumn:
    name: str
    kind: Kind
    nullable: bool


def state_columns(spec: DatasourceSpec) -> tuple[StateColumn, ...]:
    """How each of ``spec.rollup_state_columns`` is stored."""
    ds = spec.datasource
    out = []
    # The time is kept even without rollups: a key's partition is its bucket.
    for name in spec.rollup_state_columns if spec.rollups else (ds.time,):
        column = spec.columns[name]
        kind: Kind
        if name == ds.tenant:
            kind = "tenant"
        elif name == ds.time or column.type == "timestamp":
            kind = "time"
        elif column.type == "string":
            kind = "code"
        elif column.type == "bool":
            kind = "bool"
        else:
            kind = "int"
        out.append(StateColumn(name, kind, column.nullable))
    return tuple(out)


def encode_state(
    column: StateColumn, array: pa.ChunkedArray | pa.Array, codes: dict[str, Codes]
) -> dict[str, Array]:
    """The index arrays of one state column (``s:<name>``, and ``v:<name>`` validity
    for a nullable number or time); the tenant is stored once, as ``tenant``."""
    name = column.name
    if column.kind == "tenant":
        return {}
    if column.kind == "code":
        book = codes.setdefault(name, Codes())
        return {f"s:{name}": book.encode(array).astype(book.dtype)}
    if column.kind == "bool":
        values = pc.fill_null(pc.cast(array, pa.uint8()), 2)
        return {f"s:{name}": np.asarray(values, np.uint8)}
    ints = pc.cast(array, pa.int64()) if column.kind == "time" else array
    out = {f"s:{name}": np.asarray(pc.fill_null(ints, 0), np.int64)}
    if column.nullable:
        out[f"v:{name}"] = np.asarray(pc.is_valid(array), np.bool_)
    return out


def decode_state(
    column: StateColumn,
    arrays: dict[str, Array],
    tenants: Array,
    codes: dict[str, Codes],
    type_: pa.DataType,
) -> pa.Array:
    """One state column back as Arrow, in ``type_``."""
    name = column.name
    if column.kind == "tenant":
        return codes["tenant"].decode(tenants, type_)
    values = arrays[f"s:{name}"]
    if column.kind == "code":
        return codes[name].decode(values, type_)
    if column.kind == "bool":
        return pa.array(values == 1, pa.bool_(), mask=values == 2)
    valid = arrays.get(f"v:{name}")
    mask = None if valid is None else ~valid
    ints = pa.array(values, pa.int64(), mask=mask)
    return ints.cast(_TS).cast(type_) if column.kind == "time" else ints.cast(type_)
