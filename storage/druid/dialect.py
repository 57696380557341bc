"""Druid SQL as Tally's trees need it rendered: sqlglot's ``druid`` dialect, completed.

sqlglot 30's ``druid`` dialect is the generic generator with four renames, so the
dialect-neutral trees the API and the router build come out as SQL Druid refuses:
``CAST('…+09:00' AS TIMESTAMPTZ)`` (Druid has no zoned type; its TIMESTAMP is an
instant, read and written in the query's ``sqlTimeZone``), ``STR_POSITION(…)`` and a
zoned ``TIMESTAMP_TRUNC``. This dialect (registered by sqlglot as ``tallydruid`` when
this module is imported, which importing the backend does) renders those as Druid 33
runs them — ``TIME_PARSE`` of the ISO text (offset kept), ``STRPOS``, ``TIME_FLOOR``
with an ISO period and the zone (a zoned truncation, ``storage.sql.bucket_expr``) —
and everything else as sqlglot's ``druid`` does. It
is a subclass, not a patch of sqlglot's registry: other ``druid`` users are untouched.
"""

from __future__ import annotations

from typing import Any

from sqlglot import exp, transforms
from sqlglot.dialects.druid import Druid
from sqlglot.generators.druid import DruidGenerator

from storage.sql import group_by_all_as_positions

NAME = "tallydruid"
_PERIODS = {"HOUR": "PT1H", "DAY": "P1D", "WEEK": "P1W", "MONTH": "P1M", "YEAR": "P1Y"}
_TIME_TYPES = {exp.DType.TIMESTAMPTZ, exp.DType.TIMESTAMP, exp.DType.TIMESTAMPLTZ}


def period(unit: str) -> str:
    """The ISO 8601 period ``TIME_FLOOR`` takes for a truncation unit (``day`` → P1D)."""
    try:
        return _PERIODS[unit.upper()]
    except KeyError:
        raise ValueError(f"no Druid period for the unit {unit!r}") from None


def _cast(gen: DruidGenerator, node: exp.Cast) -> str:
    to = node.to
    if to.this in _TIME_TYPES and isinstance(node.this, exp.Literal) and node.this.is_string:
        return f"TIME_PARSE({gen.sql(node.this)})"
    if to.this == exp.DType.TIMESTAMPTZ:
        return gen.cast_sql(exp.cast(node.this, "TIMESTAMP"))
    return gen.cast_sql(node)


def _trunc(gen: DruidGenerator, node: exp.TimestampTrunc) -> str:
    zone = node.args.get("zone")
    args = [gen.sql(node.this), f"'{period(node.text('unit'))}'"]
    if zone is not None:
        args += ["NULL", gen.sql(zone)]
    return f"TIME_FLOOR({', '.join(args)})"


def _at_time_zone(gen: DruidGenerator, node: exp.AtTimeZone) -> str:
    """Druid has no AT TIME ZONE; the one shape Tally builds (``storage.sql.
    bucket_expr``: the local time truncated and read back in the same zone) is
    ``TIME_FLOOR`` in that zone. Anything else is not Druid SQL: refused."""
    trunc, zone = node.this, node.args.get("zone")
    inner = trunc.this if isinstance(trunc, exp.TimestampTrunc) else None
    if isinstance(inner, exp.AtTimeZone) and zone is not None and inner.args.get("zone") == zone:
        unit = f"'{period(trunc.text('unit'))}'"
        return f"TIME_FLOOR({gen.sql(inner.this)}, {unit}, NULL, {gen.sql(zone)})"
    gen.unsupported("AT TIME ZONE: Druid has none (use TIME_FLOOR or TIME_SHIFT)")
    return gen.sql(node.this)


def _strpos(gen: DruidGenerator, node: exp.StrPosition) -> str:
    return f"STRPOS({gen.sql(node.this)}, {gen.sql(node.args['substr'])})"


class TallyDruidGenerator(DruidGenerator):
    """Quotes every identifier: Druid's parser reserves words the trees use as names
    (a metric named ``count`` aliased ``AS count`` is a syntax error there). Druid
    refuses ``NULLS FIRST/LAST`` ("ASCENDING ordering with NULLS LAST is not
    supported"): another dialect's null order is simulated with a leading sort key."""

    NULL_ORDERING_SUPPORTED = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("identify", True)
        super().__init__(*args, **kwargs)

    TRANSFORMS = {
        **DruidGenerator.TRANSFORMS,
        exp.Cast: _cast,
        exp.TimestampTrunc: _trunc,
        exp.AtTimeZone: _at_time_zone,
        exp.StrPosition: _strpos,
        exp.Select: transforms.preprocess([group_by_all_as_positions]),
    }
    TYPE_MAPPING = {**DruidGenerator.TYPE_MAPPING, exp.DType.TIMESTAMPTZ: "TIMESTAMP"}


class TallyDruid(Druid):
    # Druid sorts nulls first ascending (they compare smallest).
    NULL_ORDERING = "nulls_are_small"
    Generator = TallyDruidGenerator
