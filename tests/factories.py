"""Building blocks shared by tests: payment rows and a reference model of the store.

The reference is deliberately naive — it keeps every row ever offered and computes
"latest version per key" and every rollup from scratch — so that comparing the
store against it checks the store's incremental machinery, not a copy of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from tally.specs import DatasourceSpec
from tally.timeutil import floor

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = ("DONE", "PARTIAL_CANCELED", "CANCELED")
METHODS = ("CARD", "TRANSFER", "VIRTUAL_ACCOUNT", "MOBILE", "EASY_PAY")


def payment(
    txn_id: str,
    version: int = 1,
    *,
    event_id: str | None = None,
    merchant_id: str = "m1",
    approved_at: datetime = T0,
    amount: int = 10_000,
    canceled_amount: int = 0,
    status: str | None = None,
    method: str = "CARD",
    currency: str = "KRW",
    order_name: str = "Coffee beans",
    customer_name: str = "Kim Minji",
) -> dict[str, Any]:
    if status is None:
        status = (
            "DONE"
            if canceled_amount == 0
            else "CANCELED"
            if canceled_amount >= amount
            else "PARTIAL_CANCELED"
        )
    return {
        "event_id": event_id or f"{txn_id}-v{version}",
        "event_type": "payment.approved" if version == 1 else "payment.canceled",
        "occurred_at": approved_at + timedelta(minutes=version),
        "txn_id": txn_id,
        "version": version,
        "merchant_id": merchant_id,
        "order_id": f"order-{txn_id}",
        "order_name": order_name,
        "customer_name": customer_name,
        "method": method,
        "card_company": "SHINHAN" if method == "CARD" else None,
        "card_last4": "4242" if method == "CARD" else None,
        "currency": currency,
        "amount": amount,
        "canceled_amount": canceled_amount,
        "status": status,
        "approved_at": approved_at,
    }


def latest_by_key(
    spec: DatasourceSpec, rows: Iterable[Mapping[str, Any]]
) -> dict[str, Mapping[str, Any]]:
    """Reference merge: greatest (version, event_id) per key."""
    ds = spec.datasource
    out: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        have = out.get(row[ds.key])
        if have is None or (row[ds.version], row[ds.event_id]) > (
            have[ds.version],
            have[ds.event_id],
        ):
            out[row[ds.key]] = row
    return out


def reference_rollup(
    spec: DatasourceSpec, rollup_name: str, latest: Mapping[str, Mapping[str, Any]]
) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Rollup recomputed from scratch: (bucket, *dims) → metric values, zero groups absent."""
    rollup = spec.rollup(rollup_name)
    sums: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(spec.parsed_metrics))
    for row in latest.values():
        bucket = floor(row[spec.datasource.time], rollup.granularity, spec.tz)
        group = (bucket, *(row[d] for d in rollup.dimensions))
        for i, metric in enumerate(spec.parsed_metrics):
            sums[group][i] += metric.evaluate(row)
    return {k: tuple(v) for k, v in sums.items() if any(v)}


def normalise(value: Any) -> Any:
    """Make engine values comparable with Python ones (UTC datetimes, ints)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return value


def assert_summed_deltas_equal_reference(
    spec: DatasourceSpec,
    totals: Mapping[str, Mapping[tuple[Any, ...], Sequence[int]]],
    latest: Mapping[str, Mapping[str, Any]],
) -> None:
    """Each rollup's summed deltas (rollup → (bucket, *dims) → metric sums, normalised
    keys) equal the rollup recomputed from the latest state of every key."""
    for rollup in spec.rollups:
        got = {k: tuple(v) for k, v in totals[rollup.name].items() if any(v)}
        want = {
            tuple(normalise(x) for x in k): v
            for k, v in reference_rollup(spec, rollup.name, latest).items()
        }
        assert got == want, rollup.name
