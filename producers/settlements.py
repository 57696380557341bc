"""Settlements of generated payments (the ``settlements`` spec), consistent with them.

A payment is scheduled for payout a few business days after its approval, by method
(card acquirers pay slower than transfers); the fee is a share of the amount by
method, VAT is 10% of the fee (Korea's), and the merchant is paid the rest. Some
payouts are held first (a risk review), which moves the payout day a week later.
Each cancellation revises the settlement: before the payout it lowers what will be
paid; after it, the payout is reversed and what remains is paid out again on a later
payout day. Every revision is a new event with a higher version, emitted hours to
days after the payment's, so a stream of them arrives late and out of the payments'
order, the way a settlement domain publishes.

Deterministic: each payment's choices come from a hash of the seed and its txn_id.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from producers.generate import GeneratorConfig, PaymentGenerator, rfc3339
from tally.timeutil import parse_time

FEE_BPS = {"CARD": 220, "EASY_PAY": 250, "TRANSFER": 150, "VIRTUAL_ACCOUNT": 100, "MOBILE": 330}
PAYOUT_DELAY = {"CARD": 3, "EASY_PAY": 2, "TRANSFER": 1, "VIRTUAL_ACCOUNT": 1, "MOBILE": 5}
VAT_SHARE = 10  # percent of the fee
HOLD_DAYS = 5  # business days a held payout waits longer
PAYOUT_HOUR = 9  # local time a payout day's transfers go out
_LAG = timedelta(hours=1)  # the settlement domain runs behind the payment's
_SLICE = 2_000  # payments scheduled before what is due is let go


@dataclass(frozen=True)
class SettlementConfig:
    seed: int = 0
    hold_rate: float = 0.03
    timezone: str = "Asia/Seoul"

    def __post_init__(self) -> None:
        if not 0.0 <= self.hold_rate <= 1.0:
            raise ValueError(f"hold_rate must be within [0, 1], got {self.hold_rate}")


@dataclass
class _Payment:
    txn_id: str
    first: dict[str, Any]
    cancels: dict[str, tuple[datetime, int]]  # event_id → (occurred, cumulative canceled)


def split(net: int, method: str) -> tuple[int, int, int]:
    """(fee, vat, settled) of a net amount in minor units: fee rounds down, so the
    three always add up to the net exactly."""
    fee = net * FEE_BPS[method] // 10_000
    vat = fee * VAT_SHARE // 100
    return fee, vat, net - fee - vat


def business_days_after(day: date, n: int) -> date:
    out = day
    while n > 0:
        out += timedelta(days=1)
        if out.weekday() < 5:
            n -= 1
    return out


def generate_settlements(
    payment_events: Iterable[dict[str, Any]], config: SettlementConfig | None = None
) -> list[dict[str, Any]]:
    """Every settlement event of the payments in ``payment_events`` (wire form or
    rows, any order, duplicates allowed), ordered by ``occurred_at``."""
    cfg = config or SettlementConfig()
    out = [e for payment in _payments(payment_events) for e in _lifecycle(payment, cfg)]
    out.sort(key=_order)
    return out


def stream_settlements(
    payments: GeneratorConfig, config: SettlementConfig | None = None
) -> Iterator[dict[str, Any]]:
    """The settlements of the payments ``payments`` generates, in ``occurred_at`` order,
    a simulated day at a time (what a settlement domain publishes as it happens): a
    day's payments settle an hour after their approval at the earliest, so whatever is
    due before the next day's first settlement can go."""
    cfg = config or SettlementConfig()
    gen = PaymentGenerator(payments)
    pending: list[tuple[tuple[str, str, int], dict[str, Any]]] = []
    for day in range(payments.days):
        rows = gen.to_table(gen.day_events(day)).to_pylist()
        # In approval order, a slice at a time: every event of a payment is at least
        # _LAG after its approval, so once a slice is scheduled, whatever is due before
        # the next approval + _LAG can go. (A whole day first made the demo's first
        # settlement wait for a day's 200k payments: over a minute on a busy core.)
        day_payments = sorted(_payments(rows), key=lambda p: p.first["approved_at"])
        end = rfc3339(payments.day_start(day + 1) + _LAG)
        for start in range(0, len(day_payments), _SLICE):
            for payment in day_payments[start : start + _SLICE]:
                for event in _lifecycle(payment, cfg):
                    heapq.heappush(pending, (_order(event), event))
            following = day_payments[start + _SLICE : start + _SLICE + 1]
            cutoff = (
                rfc3339(_time(following[0].first["approved_at"]).astimezone(UTC) + _LAG)
                if following
                else end
            )
            while pending and pending[0][0][0] < cutoff:
                yield heapq.heappop(pending)[1]
    while pending:
        yield heapq.heappop(pending)[1]


def _order(event: dict[str, Any]) -> tuple[str, str, int]:
    # rfc3339() writes UTC with a fixed width: its text sorts as its time
    return event["occurred_at"], event["txn_id"], event["version"]


def _payments(events: Iterable[dict[str, Any]]) -> Iterator[_Payment]:
    payments: dict[str, _Payment] = {}
    for event in events:
        if not isinstance(event, dict) or "txn_id" not in event:
            continue
        txn = payments.setdefault(event["txn_id"], _Payment(event["txn_id"], {}, {}))
        if event.get("event_type") == "payment.approved":
            txn.first = event
        else:
            at, canceled = _time(event["occurred_at"]), int(event["canceled_amount"])
            txn.cancels[event["event_id"]] = (at, canceled)  # a redelivery counts once
    return (p for p in payments.values() if p.first)


def _time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else parse_time(value)


def _lifecycle(payment: _Payment, cfg: SettlementConfig) -> Iterator[dict[str, Any]]:
    tz = ZoneInfo(cfg.timezone)
    first, txn_id = payment.first, payment.txn_id
    method, amount = first["method"], int(first["amount"])
    approved = _time(first["approved_at"])
    digest = hashlib.blake2b(f"{cfg.seed}:{txn_id}".encode(), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    version = 0
    net = amount
    status = "SCHEDULED"
    payout_day = business_days_after(approved.astimezone(tz).date(), PAYOUT_DELAY[method])
    paid: tuple[int, int, int] | None = None

    def event(kind: str, at: datetime, amounts: tuple[int, int, int]) -> dict[str, Any]:
        nonlocal version
        version += 1
        fee, vat, settled = amounts
        midnight = datetime.combine(payout_day, time(0), tz)
        return {
            "event_id": f"{txn_id}-s{version}",
            "event_type": f"settlement.{kind.lower()}",
            "occurred_at": rfc3339(at.astimezone(UTC)),
            "txn_id": txn_id,
            "version": version,
            "merchant_id": first["merchant_id"],
            "payout_id": f"po_{first['merchant_id']}_{payout_day:%Y%m%d}",
            "method": method,
            "currency": first["currency"],
            "payment_amount": fee + vat + settled,
            "fee": fee,
            "vat": vat,
            "settled_amount": settled,
            "status": kind,
            "payout_at": rfc3339(midnight.astimezone(UTC)),
        }

    def payout_time() -> datetime:
        return datetime.combine(payout_day, time(PAYOUT_HOUR), tz)

    yield event("SCHEDULED", approved + _LAG, split(net, method))
    if rng.random() < cfg.hold_rate:
        status = "HELD"
        payout_day = business_days_after(payout_day, HOLD_DAYS)
        yield event("HELD", approved + 2 * _LAG, split(net, method))
    pending: datetime | None = payout_time()
    for at, canceled in sorted(payment.cancels.values()):
        if pending is not None and pending <= at:
            yield from _pay(event, pending, net, method)
            paid, pending = split(net, method), None
        net = max(0, amount - canceled)
        if pending is not None:  # not paid yet: what will be paid is less
            yield event(status, at + timedelta(minutes=1), split(net, method))
        else:  # paid already: reverse it, pay what remains later
            assert paid is not None
            yield event("REVERSED", at + _LAG, paid)
            if net > 0:
                payout_day = business_days_after(at.astimezone(tz).date(), PAYOUT_DELAY[method])
                status, pending = "SCHEDULED", payout_time()
                yield event(status, at + 2 * _LAG, split(net, method))
    if pending is not None:
        yield from _pay(event, pending, net, method)


def _pay(event: Any, at: datetime, net: int, method: str) -> Iterator[dict[str, Any]]:
    """The payout on its day: nothing left to pay (canceled in full) is a reversal."""
    yield event("PAID_OUT" if net > 0 else "REVERSED", at, split(net, method))
