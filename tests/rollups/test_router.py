"""The rollup router: which source answers, the SQL it produces, and exactness."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from hypothesis import given, settings
from hypothesis import strategies as st

from rollups.request import AggregateRequest
from rollups.router import BASE, bind, choose, route, run
from storage import OlapReader, open_reader, open_store
from tally.errors import RoutingError
from tally.settings import Settings
from tally.specs import DatasourceSpec, SpecRegistry
from tally.timeutil import floor
from tests.factories import METHODS, latest_by_key, payment

KST = timezone(timedelta(hours=9))
FIXTURES = Path(__file__).parent / "fixtures" / "router"
JAN = datetime(2026, 1, 1, tzinfo=KST)


def req(**kw: Any) -> AggregateRequest:
    base: dict[str, Any] = {"start": JAN, "end": JAN + timedelta(days=31), "granularity": "day"}
    return AggregateRequest(**(base | kw))


CASES = {
    "daily_by_currency_uses_daily": req(group_by=("currency",), filters={"merchant_id": ["m1"]}),
    "daily_by_method_uses_hourly": req(group_by=("method",), filters={"merchant_id": ["m1"]}),
    "hourly_uses_hourly": req(granularity="hour", end=JAN + timedelta(days=1)),
    "monthly_uses_daily": req(granularity="month", end=JAN + timedelta(days=59)),
    "unaligned_start_falls_back_to_base": req(start=JAN + timedelta(minutes=30)),
    "card_company_is_no_rollup_dimension": req(group_by=("card_company",)),
    "utc_midnight_is_not_a_seoul_day_so_hourly": req(
        start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 1, 3, tzinfo=UTC)
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_route_sql_matches_fixture(payments_spec: DatasourceSpec, name: str) -> None:
    routed = route(payments_spec, CASES[name])
    text = (
        f"-- source: {routed.source}\n"
        + sqlglot.transpile(routed.sql("duckdb"), read="duckdb", pretty=True)[0]
        + "\n"
    )
    path = FIXTURES / f"{name}.sql"
    if os.environ.get("UPDATE_FIXTURES"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(CASES))
def test_base_route_sql_in_druid_matches_fixture(payments_spec: DatasourceSpec, name: str) -> None:
    """The same requests answered from the base (forced), rendered for Druid:
    TIME_FLOOR in the datasource's zone, TIME_PARSE bounds."""
    from storage.druid import dialect

    routed = route(payments_spec, CASES[name], force_base=True)
    text = sqlglot.transpile(routed.sql(dialect.NAME), read=dialect.NAME, pretty=True)[0] + "\n"
    path = FIXTURES.with_name("router_druid") / f"{name}.sql"
    if os.environ.get("UPDATE_FIXTURES"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_coarsest_rollup_wins(payments_spec: DatasourceSpec) -> None:
    assert choose(payments_spec, req(group_by=("currency",))).name == "payments_daily"  # type: ignore[union-attr]
    assert choose(payments_spec, req(group_by=("status",))).name == "payments_hourly"  # type: ignore[union-attr]
    assert choose(payments_spec, req(group_by=("order_name",))) is None


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(end=JAN), "'to' must be after 'from'"),
        (req(group_by=("amount",)), "not a dimension"),
        (req(filters={"nope": ["x"]}), "not a dimension"),
        (req(group_by=("method", "method")), "repeats"),
        (req(start=datetime(2026, 1, 1)), "time zone"),
    ],
)
def test_bad_requests_say_why(
    payments_spec: DatasourceSpec, request_: AggregateRequest, message: str
) -> None:
    with pytest.raises(RoutingError, match=message):
        route(payments_spec, request_)


def _source(spec: DatasourceSpec, routed: Any) -> str:
    return spec.name if routed.source == BASE else str(routed.source)


# --- exactness against the data ---------------------------------------------------------

ROWS_SEED = 7


def _history(n: int) -> list[dict[str, Any]]:
    rng = random.Random(ROWS_SEED)
    events = []
    for i in range(n):
        at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=rng.randrange(60 * 24 * 60))
        amount = rng.randrange(1, 100) * 1000
        merchant = rng.choice(["m1", "m1", "m2", "m3"])
        method = rng.choice(METHODS)
        currency = rng.choice(["KRW", "KRW", "USD"])
        events.append(
            payment(
                f"t{i}",
                1,
                approved_at=at,
                amount=amount,
                merchant_id=merchant,
                method=method,
                currency=currency,
            )
        )
        if rng.random() < 0.3:
            cancel = min(amount, rng.randrange(1, 100) * 1000)
            events.append(
                payment(
                    f"t{i}",
                    2,
                    approved_at=at,
                    amount=amount,
                    merchant_id=merchant,
                    method=method,
                    currency=currency,
                    canceled_amount=cancel,
                )
            )
    rng.shuffle(events)
    return events


@pytest.fixture(scope="module")
def loaded(
    registry: SpecRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OlapReader, list[dict[str, Any]]]]:
    conf = Settings(data_dir=tmp_path_factory.mktemp("router"))
    store = open_store(conf, registry)
    events = _history(3000)
    for i in range(0, len(events), 500):
        store.commit("payments", events[i : i + 500])
    store.close()
    reader = open_reader(conf, registry)
    yield reader, events
    reader.close()


def _reference(
    spec: DatasourceSpec, events: list[dict[str, Any]], request: AggregateRequest
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    out: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row in latest_by_key(spec, events).values():
        at = row["approved_at"]
        if not (request.start <= at < request.end):
            continue
        if any(row[k] not in v for k, v in request.filters.items()):
            continue
        key = (floor(at, request.granularity, spec.tz), *(row[g] for g in request.group_by))
        acc = out[key]
        acc[0] += 1
        acc[1] += row["amount"]
        acc[2] += row["canceled_amount"]
        acc[3] += row["amount"] - row["canceled_amount"]
    return {k: tuple(v) for k, v in out.items()}


def _answer(
    reader: OlapReader, spec: DatasourceSpec, request: AggregateRequest, force_base: bool
) -> tuple[str, dict[tuple[Any, ...], tuple[int, ...]]]:
    routed = route(spec, request, force_base=force_base)
    width = 1 + len(request.group_by)

    def keyed(rows: list[list[Any]]) -> dict[tuple[Any, ...], tuple[int, ...]]:
        return {(r[0].astimezone(UTC), *r[1:width]): tuple(r[width:]) for r in rows}

    over_views = keyed(reader.query(routed.sql("duckdb")).rows)
    pruned_route, pruned = run(reader, spec, request, force_base=force_base)
    bound = bind(routed, reader.relation(_source(spec, routed), request.start, request.end)).sql(
        "duckdb"
    )
    assert "read_parquet" in bound.lower() or "where false" in bound.lower(), bound
    assert pruned_route.source == routed.source
    assert keyed(pruned.rows) == over_views, "partition pruning changed the answer"
    assert list(keyed(pruned.rows)) == list(over_views), "rows came back in another order"
    return routed.source, over_views


@settings(max_examples=40, deadline=None)
@given(
    start_day=st.integers(0, 50),
    days=st.integers(1, 20),
    start_hour=st.sampled_from([0, 0, 0, 7]),
    end_hour=st.sampled_from([0, 0, 0, 13]),
    granularity=st.sampled_from(["hour", "day", "month"]),
    group_by=st.lists(st.sampled_from(["method", "status", "currency"]), unique=True, max_size=2),
    merchant=st.sampled_from([None, "m1", "m2"]),
)
def test_routed_answers_equal_the_base_and_the_reference(
    loaded: tuple[OlapReader, list[dict[str, Any]]],
    payments_spec: DatasourceSpec,
    start_day: int,
    days: int,
    start_hour: int,
    end_hour: int,
    granularity: Any,
    group_by: list[str],
    merchant: str | None,
) -> None:
    reader, events = loaded
    start = JAN + timedelta(days=start_day, hours=start_hour)
    request = AggregateRequest(
        start=start,
        end=JAN + timedelta(days=start_day + days, hours=end_hour),
        granularity=granularity,
        group_by=tuple(group_by),
        filters={"merchant_id": [merchant]} if merchant else {},
    )
    source, routed = _answer(reader, payments_spec, request, force_base=False)
    base_source, base = _answer(reader, payments_spec, request, force_base=True)
    assert base_source == "base"
    expected = {
        (k[0].astimezone(UTC), *k[1:]): v
        for k, v in _reference(payments_spec, events, request).items()
    }
    assert base == expected
    assert routed == expected, f"{source} disagrees with the base"
    if start_hour == end_hour == 0 and granularity != "hour":
        assert source != "base"  # aligned day ranges must be served by a rollup
