"""Datasource specs: the shipped default, and errors that name file, key and problem."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tally.errors import SpecError, UnknownDatasource
from tally.specs import SpecRegistry, builtin_spec_paths, load_spec, spec_paths

PAYMENTS = next(p for p in builtin_spec_paths() if p.name == "payments.toml")


def test_the_shipped_payments_spec() -> None:
    spec = load_spec(PAYMENTS)
    ds = spec.datasource
    assert (ds.topic, ds.key, ds.version, ds.time, ds.granularity) == (
        "payments.v1",
        "txn_id",
        "version",
        "approved_at",
        "day",
    )
    assert (ds.timezone, ds.tenant) == ("Asia/Seoul", "merchant_id")
    assert ds.searchable == ("order_id", "order_name", "customer_name", "card_last4")
    hourly, daily = spec.rollups
    assert (hourly.granularity, hourly.dimensions) == (
        "hour",
        ("merchant_id", "method", "status", "currency"),
    )
    assert (daily.granularity, daily.dimensions) == ("day", ("merchant_id", "currency"))
    assert [m.name for m in spec.parsed_metrics] == [
        "count",
        "gross_amount",
        "canceled_amount",
        "net_amount",
    ]
    assert spec.dead_letter_topic == "payments.v1.dlq"


def _write(tmp_path: Path, mutate: Any) -> Path:
    data = tomllib.loads(PAYMENTS.read_text())
    mutate(data)
    path = tmp_path / "broken.toml"
    path.write_text(_to_toml(data))
    return path


def _to_toml(data: dict[str, Any]) -> str:
    """Just enough TOML writing for these specs (tables, arrays of tables, scalars)."""
    import json

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    out = []
    for table, body in data.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{table}]]")
                out += [f"{k} = {value(v)}" for k, v in item.items()]
        else:
            out.append(f"[{table}]")
            out += [f"{k} = {value(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("mutate", "key", "problem"),
    [
        (
            lambda d: d["datasource"].update(timezone="Mars/Base"),
            "datasource.timezone",
            "unknown time zone",
        ),
        (lambda d: d["datasource"].update(key="nope"), "datasource.key", "not declared"),
        (lambda d: d["datasource"].update(granularity="week"), "datasource.granularity", "'hour'"),
        (lambda d: d["columns"].update(amount="float"), "columns.amount", "'string'"),
        (
            lambda d: d["metrics"].update(avg_amount="avg(amount)"),
            "metrics.avg_amount",
            "only count(*) and sum",
        ),
        (lambda d: d["metrics"].update(bad="sum(order_name)"), "metrics.bad", "not a declared int"),
        (
            lambda d: d["rollups"][0].update(dimensions=["method"]),
            "rollups[0].dimensions",
            "tenant column",
        ),
        (
            lambda d: d["rollups"][1].update(name="payments_hourly"),
            "rollups[1].name",
            "already used",
        ),
        (lambda d: d["datasource"].update(surprise=1), "datasource.surprise", "Extra inputs"),
        (
            lambda d: d["datasource"].update(active_window="soon"),
            "datasource.active_window",
            "duration",
        ),
        (lambda d: d.update(sinks={"search": {"sample": 0}}), "sinks.search.sample", "than 0"),
        (lambda d: d.update(sinks={"search": {"sample": 1.5}}), "sinks.search.sample", "1"),
        (
            lambda d: d.update(sinks={"search": {"filter": "nope = 1"}}),
            "sinks.search.filter",
            "unknown column 'nope'",
        ),
        (
            lambda d: d.update(sinks={"olap": {"filter": "lower(status) = 'done'"}}),
            "sinks.olap.filter",
            "unsupported in a filter: 'LOWER(status)'",
        ),
        (
            lambda d: d.update(sinks={"search": {"filter": "amount >"}}),
            "sinks.search.filter",
            "not a SQL predicate",
        ),
        (
            lambda d: d.update(sinks={"search": {"filter": "amount = 'many'"}}),
            "sinks.search.filter",
            "cannot be evaluated on the declared column types",
        ),
        (lambda d: d.update(sinks={"relay": {"sample": 0.5}}), "sinks.relay", "'olap' or 'search'"),
    ],
)
def test_a_malformed_spec_names_file_key_and_problem(
    tmp_path: Path, mutate: Any, key: str, problem: str
) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert "\n" not in message  # one line
    assert message.startswith(f"{path}: ")
    assert key in message
    assert problem in message


def test_invalid_toml_and_missing_files_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[datasource\nname=")
    with pytest.raises(SpecError, match=r"bad.toml: invalid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match=r"missing.toml: cannot read spec"):
        load_spec(tmp_path / "missing.toml")


def test_a_second_datasource_is_one_more_spec(tmp_path: Path) -> None:
    def settlements(d: dict[str, Any]) -> None:
        d["datasource"].update(name="settlements", topic="settlements.v1")
        for r in d["rollups"]:
            r["name"] = r["name"].replace("payments", "settlements")

    registry = SpecRegistry.load([PAYMENTS, _write(tmp_path, settlements)])
    assert registry.names() == ["payments", "settlements"]
    assert registry.get("settlements").datasource.topic == "settlements.v1"
    with pytest.raises(UnknownDatasource, match="known: payments, settlements"):
        registry.get("refunds")
    with pytest.raises(SpecError, match="declared twice"):
        SpecRegistry.load([PAYMENTS, PAYMENTS])


def test_shipped_specs_are_turned_on_by_name_and_an_unknown_name_is_one_line() -> None:
    assert [p.stem for p in spec_paths([])] == ["payments"]  # the default
    named = spec_paths([Path("payments"), Path("access_logs")])
    registry = SpecRegistry.load(named)
    assert sorted(registry.names()) == ["access_logs", "payments"]
    logs = registry.get("access_logs")
    assert logs.selection("search").sample == 0.1 and logs.selection("olap").everything
    assert [r.name for r in logs.rollups] == ["access_logs_hourly"]
    with pytest.raises(SpecError) as caught:
        spec_paths([Path("ledger")])
    assert str(caught.value) == (
        "specs: no shipped spec 'ledger' (shipped: access_logs, settlements, payments)"
    )
