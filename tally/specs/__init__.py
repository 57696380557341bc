"""Datasource specs: what a datasource is, declared in TOML rather than coded.

A spec names the topic, key, version, partition-time column and granularity, time
zone, tenant column, typed columns, searchable fields, metrics and rollups. Loading
validates everything up front so a malformed spec fails at start with a message
naming the file, the key and the problem, never later inside ingestion.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tally.errors import SpecError, UnknownDatasource
from tally.specs.metrics import Metric, parse_metric
from tally.specs.selection import parse_filter
from tally.timeutil import Granularity, coarser_or_equal, parse_duration

ColumnType = Literal["string", "int", "timestamp", "bool"]
# Served first under backlog by an ingest process serving several (ingest.priority).
Priority = Literal["critical", "high", "normal", "low"]
_IDENT = r"^[a-z][a-z0-9_]*$"


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ColumnType
    nullable: bool = False
    values: tuple[str, ...] | None = None
    pattern: str | None = None
    min: int | None = None


class Rollup(BaseModel):
    """An ingestion-time aggregate, maintained by retraction in the same commit as the base."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_IDENT)
    granularity: Granularity
    dimensions: tuple[str, ...]
    partition: Granularity = "month"

    @model_validator(mode="after")
    def _partition_holds_buckets(self) -> Rollup:
        if not coarser_or_equal(self.partition, self.granularity):
            raise ValueError(
                f"partition {self.partition!r} is finer than granularity {self.granularity!r}"
            )
        return self


class Datasource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=_IDENT)
    topic: str
    dead_letter_topic: str | None = None
    key: str
    version: str
    event_id: str
    event_type: str | None = None
    event_types: tuple[str, ...] = ()
    time: str
    granularity: Granularity = "day"
    timezone: str = "UTC"
    tenant: str
    searchable: tuple[str, ...] = ()
    active_window: str = "1d"
    priority: Priority = "normal"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("active_window")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class Relation(BaseModel):
    """This datasource's entities belong to another's, with the same key: a payment's
    settlement. The query API shows the related entity in the other's details (under
    ``as``) and joins the two on the key."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    of: str = Field(pattern=_IDENT)
    as_: str = Field(alias="as", pattern=_IDENT)


class SinkSelection(BaseModel):
    """What one sink keeps of a datasource (:mod:`tally.specs.selection`): a share of
    the keys, decided by key, and a filter over the event's columns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample: float = Field(1.0, gt=0, le=1)
    filter: str | None = None

    @property
    def everything(self) -> bool:
        return self.sample >= 1 and self.filter is None


class DatasourceSpec(BaseModel):
    """A validated datasource spec. Frozen: specs are read once per process."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasource: Datasource
    columns: dict[str, Column]
    metrics: dict[str, str] = Field(default_factory=dict)
    rollups: tuple[Rollup, ...] = ()
    # Per sink (``olap``, ``search``): what it keeps; every event where not declared.
    sinks: dict[Literal["olap", "search"], SinkSelection] = Field(default_factory=dict)
    relation: Relation | None = None
    source: str = "<memory>"

    @field_validator("columns", mode="before")
    @classmethod
    def _short_columns(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: {"type": v} if isinstance(v, str) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DatasourceSpec:
        ds, cols = self.datasource, self.columns
        for name in cols:
            if not _is_ident(name):
                raise ValueError(f"columns.{name}: column names must match {_IDENT}")
        required = {
            "key": (ds.key, "string"),
            "version": (ds.version, "int"),
            "event_id": (ds.event_id, "string"),
            "time": (ds.time, "timestamp"),
            "tenant": (ds.tenant, "string"),
        }
        if ds.event_type:
            required["event_type"] = (ds.event_type, "string")
        for role, (col, typ) in required.items():
            if col not in cols:
                raise ValueError(f"datasource.{role}: column {col!r} is not declared in [columns]")
            if cols[col].type != typ:
                raise ValueError(f"datasource.{role}: column {col!r} must be {typ}")
            if cols[col].nullable:
                raise ValueError(f"datasource.{role}: column {col!r} cannot be nullable")
        for field in ds.searchable:
            if field not in cols:
                raise ValueError(f"datasource.searchable: unknown column {field!r}")
        for name, text in self.metrics.items():
            if not _is_ident(name):
                raise ValueError(f"metrics.{name}: metric names must match {_IDENT}")
            try:
                parse_metric(name, text, {c: v.type for c, v in cols.items()})
            except ValueError as exc:
                raise ValueError(f"metrics.{name}: {exc}") from None
        seen = {ds.name}
        for i, rollup in enumerate(self.rollups):
            if rollup.name in seen:
                raise ValueError(f"rollups[{i}].name: {rollup.name!r} is already used")
            seen.add(rollup.name)
            for dim in rollup.dimensions:
                if dim not in cols:
                    raise ValueError(f"rollups[{i}].dimensions: unknown column {dim!r}")
            if ds.tenant not in rollup.dimensions:
                raise ValueError(
                    f"rollups[{i}].dimensions: must include the tenant column {ds.tenant!r}"
                )
            if not coarser_or_equal(ds.granularity, rollup.granularity) and not coarser_or_equal(
                rollup.granularity, ds.granularity
            ):
                raise ValueError(f"rollups[{i}].granularity: not comparable")
        for sink, chosen in self.sinks.items():
            if chosen.filter is not None:
                try:
                    parse_filter(chosen.filter, {c: v.type for c, v in cols.items()})
                except ValueError as exc:
                    raise ValueError(f"sinks.{sink}.filter: {exc}") from None
        if self.rollups and not any(m.kind == "count" for m in self.parsed_metrics):
            # Groups netting to zero are hidden; only a count makes "zero" mean "no rows".
            raise ValueError("rollups: a datasource with rollups needs a count(*) metric")
        return self

    # --- derived, cached -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.datasource.name

    @cached_property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.datasource.timezone)

    @cached_property
    def parsed_metrics(self) -> tuple[Metric, ...]:
        types = {c: v.type for c, v in self.columns.items()}
        return tuple(parse_metric(n, t, types) for n, t in self.metrics.items())

    @cached_property
    def rollup_state_columns(self) -> tuple[str, ...]:
        """Columns whose previous value the store must remember to retract a key."""
        cols: list[str] = [self.datasource.time]
        for rollup in self.rollups:
            cols.extend(rollup.dimensions)
        for metric in self.parsed_metrics:
            cols.extend(metric.columns)
        return tuple(dict.fromkeys(cols))

    @cached_property
    def timestamps(self) -> tuple[str, ...]:
        """The timestamp columns: what an event's RFC 3339 text is parsed into."""
        return tuple(n for n, c in self.columns.items() if c.type == "timestamp")

    @property
    def dead_letter_topic(self) -> str:
        return self.datasource.dead_letter_topic or f"{self.datasource.topic}.dlq"

    def selection(self, sink: str) -> SinkSelection:
        """What ``sink`` keeps (everything unless the spec says otherwise)."""
        for name, chosen in self.sinks.items():
            if name == sink:
                return chosen
        return SinkSelection()

    def rollup(self, name: str) -> Rollup:
        for rollup in self.rollups:
            if rollup.name == name:
                return rollup
        raise UnknownDatasource(f"datasource {self.name!r} has no rollup {name!r}")


def _check_relation(spec: DatasourceSpec, other: DatasourceSpec) -> None:
    """A related datasource shares its key's and tenant's meaning with the other: both
    must be the same columns by type, and its ``as`` name no column of the other."""
    assert spec.relation is not None
    where = f"{spec.source}: relation"
    if spec.relation.as_ in other.columns:
        raise SpecError(f"{where}.as: {other.name!r} already has a column {spec.relation.as_!r}")
    mine, theirs = spec.datasource, other.datasource
    for role, a, b in (("key", mine.key, theirs.key), ("tenant", mine.tenant, theirs.tenant)):
        if spec.columns[a].type != other.columns[b].type:
            raise SpecError(f"{where}.of: the {role} {a!r} differs in type from {other.name}.{b}")


def _is_ident(name: str) -> bool:
    import re

    return re.match(_IDENT, name) is not None


def _format_error(source: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def parse_spec(data: dict[str, Any], source: str) -> DatasourceSpec:
    try:
        return DatasourceSpec.model_validate({**data, "source": source})
    except ValidationError as exc:
        raise SpecError(_format_error(source, exc)) from exc


def load_spec(path: Path) -> DatasourceSpec:
    """Load and validate one spec file; errors name the file, the key and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from exc
    return parse_spec(data, str(path))


def builtin_spec_paths() -> list[Path]:
    """The datasources a deployment runs when it names none: payments."""
    folder = resources.files("tally.specs")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml"))


def shipped_spec_paths() -> dict[str, Path]:
    """Every spec Tally ships, by datasource name: the default ones and the catalog's
    (``access_logs``...), which a deployment turns on by naming them in ``specs``."""
    folder = resources.files("tally.specs")
    catalog = folder / "catalog"
    found = [*builtin_spec_paths()]
    if catalog.is_dir():
        found += [Path(str(p)) for p in catalog.iterdir() if p.name.endswith(".toml")]
    return {p.stem: p for p in sorted(found)}


def spec_paths(entries: Iterable[Path]) -> list[Path]:
    """The spec files ``entries`` (the ``specs`` setting) name: a path to a TOML file,
    or the bare name of a shipped spec (``payments``, ``access_logs``); none means the
    default ones."""
    wanted = list(entries)
    if not wanted:
        return builtin_spec_paths()
    shipped = shipped_spec_paths()
    out: list[Path] = []
    for entry in wanted:
        if entry.suffix == ".toml" or len(entry.parts) > 1:
            out.append(entry)
        elif entry.name in shipped:
            out.append(shipped[entry.name])
        else:
            known = ", ".join(shipped)
            raise SpecError(f"specs: no shipped spec {entry.name!r} (shipped: {known})")
    return out


class SpecRegistry:
    """The datasources one process knows, by name (rollup names resolve to their base)."""

    def __init__(self, specs: Iterable[DatasourceSpec]) -> None:
        self._specs: dict[str, DatasourceSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise SpecError(f"{spec.source}: datasource {spec.name!r} is declared twice")
            self._specs[spec.name] = spec
        for spec in self._specs.values():
            of = spec.relation.of if spec.relation else None
            if of is not None and of in self._specs and of != spec.name:
                _check_relation(spec, self._specs[of])

    @classmethod
    def load(cls, paths: Iterable[Path]) -> SpecRegistry:
        return cls(load_spec(p) for p in paths)

    def __iter__(self) -> Any:
        return iter(self._specs.values())

    def names(self) -> list[str]:
        return list(self._specs)

    def get(self, name: str) -> DatasourceSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise UnknownDatasource(f"unknown datasource {name!r} (known: {known})") from None

    def related(self, name: str) -> list[DatasourceSpec]:
        """The loaded datasources whose entities belong to ``name``'s (their relation)."""
        return [s for s in self._specs.values() if s.relation and s.relation.of == name]

    def owner(self, name: str) -> tuple[DatasourceSpec, Rollup | None]:
        """(base spec, rollup or None) for the name of a base datasource or a rollup."""
        for spec in self._specs.values():
            if spec.name == name:
                return spec, None
            for rollup in spec.rollups:
                if rollup.name == name:
                    return spec, rollup
        self.get(name)  # raises UnknownDatasource with the known names
        raise AssertionError("unreachable")
