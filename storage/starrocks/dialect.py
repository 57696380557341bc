"""StarRocks SQL as Tally's trees need it rendered: sqlglot's ``starrocks``, completed.

sqlglot renders the dialect-neutral trees of the API and the router for StarRocks
with two silent losses: ``AT TIME ZONE`` is dropped ("not supported by MySQL"), so a
day in Asia/Seoul would be truncated in UTC, and ``CAST('…+09:00' AS TIMESTAMPTZ)``
becomes ``TIMESTAMP('…')``, which drops the offset. Tally stores instants as UTC
DATETIMEs, so this dialect (``tallystarrocks``, registered by importing the module)
renders the one zoned shape Tally builds (``storage.sql.bucket_expr``) with
``CONVERT_TZ`` and a zoned literal as its UTC DATETIME; ``GROUP BY ALL`` as
positions. Everything else is sqlglot's ``starrocks``; anything else zoned is refused.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlglot import exp, transforms
from sqlglot.dialects.starrocks import StarRocks
from sqlglot.generators.starrocks import StarRocksGenerator

from storage.sql import group_by_all_as_positions

NAME = "tallystarrocks"
_UTC = "'UTC'"


def _at_time_zone(gen: StarRocksGenerator, node: exp.AtTimeZone) -> str:
    """``bucket_expr``'s shape: the local time in zone z truncated and read back in z,
    i.e. ``CONVERT_TZ(DATE_TRUNC(u, CONVERT_TZ(x, 'UTC', z)), z, 'UTC')``."""
    trunc, zone = node.this, node.args.get("zone")
    inner = trunc.this if isinstance(trunc, exp.TimestampTrunc) else None
    if isinstance(inner, exp.AtTimeZone) and zone is not None and inner.args.get("zone") == zone:
        z = gen.sql(zone)
        unit = trunc.text("unit").lower()
        local = f"CONVERT_TZ({gen.sql(inner.this)}, {_UTC}, {z})"
        return f"CONVERT_TZ(DATE_TRUNC('{unit}', {local}), {z}, {_UTC})"
    gen.unsupported("AT TIME ZONE: only a zoned truncation (storage.sql.bucket_expr)")
    return gen.sql(node.this)


def _cast(gen: StarRocksGenerator, node: exp.Cast) -> str:
    """A zoned instant literal as the UTC DATETIME Tally stores."""
    if (
        node.to.this == exp.DType.TIMESTAMPTZ
        and isinstance(node.this, exp.Literal)
        and node.this.is_string
    ):
        value = datetime.fromisoformat(node.this.this)
        if value.tzinfo is None:
            gen.unsupported("a TIMESTAMPTZ literal without an offset")
            value = value.replace(tzinfo=UTC)
        text = value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return f"CAST('{text}' AS DATETIME)"
    return gen.cast_sql(node)


class TallyStarRocksGenerator(StarRocksGenerator):
    TRANSFORMS = {
        **StarRocksGenerator.TRANSFORMS,
        exp.AtTimeZone: _at_time_zone,
        exp.Cast: _cast,
        exp.Select: transforms.preprocess([group_by_all_as_positions]),
    }


class TallyStarRocks(StarRocks):
    Generator = TallyStarRocksGenerator
