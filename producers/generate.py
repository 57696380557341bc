"""Realistic synthetic payment events, deterministic for a seed.

What it models (DESIGN §2): payments approved through the day with a Seoul-shaped
daily rhythm and a weekly one; merchant volumes skewed Zipf-like, each merchant in
a category that decides its products and its price distribution; mostly KRW with
some USD and JPY from the few global merchants; CARD, EASY_PAY, TRANSFER,
VIRTUAL_ACCOUNT and MOBILE in realistic proportions. Some payments are canceled
later — fully, partially, or partially and then again — hours to weeks after
approval: a cancellation is a new event with a higher version, a later
``occurred_at``, a cumulative ``canceled_amount`` and the *original*
``approved_at``, so it lands in an old partition. Delivery is imperfect:
duplicates are redelivered (same ``event_id``, identical payload) and some later
versions are emitted before earlier ones.

All work is vectorised with numpy per simulated day. Day ``d`` depends only on
``(seed, d)``, and every id is a bijective scramble of a counter, so ids never
repeat within one seed. Two outputs share that core:

- :func:`generate_events` — event dicts in wire form (JSON-ready, times as
  RFC 3339 strings) in emission order;
- :func:`generate_tables` / :func:`approval_tables` — Arrow tables in the store's
  base schema, for benchmarks that need millions of rows per minute;
- :func:`cancellations_for` — the next cancellation of given stored payments, for
  callers that choose which old keys a late write touches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tally.specs import DatasourceSpec

US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 24 * HOUR_US
TS = pa.timestamp("us", tz="UTC")

METHODS = ("CARD", "EASY_PAY", "TRANSFER", "VIRTUAL_ACCOUNT", "MOBILE")
METHOD_WEIGHTS = (0.56, 0.24, 0.08, 0.07, 0.05)
CARD_COMPANIES = ("SHINHAN", "KB", "SAMSUNG", "HYUNDAI", "LOTTE", "HANA", "WOORI", "NH", "BC")
CARD_WEIGHTS = (0.20, 0.17, 0.15, 0.13, 0.09, 0.08, 0.07, 0.07, 0.04)
CURRENCIES = ("KRW", "USD", "JPY")
STATUSES = ("DONE", "PARTIAL_CANCELED", "CANCELED")
EVENT_TYPES = ("payment.approved", "payment.partially_canceled", "payment.canceled")
DONE, PARTIAL, CANCELED = 0, 1, 2
APPROVED_EVT, PARTIAL_EVT, CANCELED_EVT = 0, 1, 2
# Approximate won per minor unit, and the rounding step of each currency's prices.
_KRW_PER_MINOR = np.array([1.0, 13.8, 9.2])
_STEP = np.array([100, 1, 10], dtype=np.int64)
_MIN_AMOUNT = np.array([1_000, 99, 100], dtype=np.int64)
# Share of a day's approvals in each local hour (Seoul: quiet nights, evening peak).
_HOURLY = np.array(
    [2.0, 1.2, 0.7, 0.4, 0.3, 0.4, 0.8, 1.5, 2.6, 3.6, 4.5, 5.0,
     6.0, 5.6, 5.0, 4.9, 5.1, 5.5, 6.0, 6.6, 6.7, 6.2, 5.1, 3.6]
)  # fmt: skip
_WEEKDAY = np.array([0.95, 0.94, 0.97, 1.0, 1.08, 1.14, 1.02])  # Monday first


@dataclass(frozen=True)
class Category:
    name: str
    share: float  # of merchants
    median_krw: float  # price distribution: lognormal around the median
    sigma: float
    products: tuple[str, ...]


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split("|"))


CATEGORIES: tuple[Category, ...] = (
    Category("cafe", 0.18, 7_500, 0.45, _words(
        "아메리카노|카페라떼|바닐라라떼|콜드브루|Cold brew|Flat white|딸기 케이크|Croissant"
        "|원두 200g|Drip bag set")),
    Category("food", 0.17, 24_000, 0.45, _words(
        "후라이드 치킨|양념치킨 반반|떡볶이 세트|마라탕|김치찌개 2인분|Pepperoni pizza|Poke bowl"
        "|족발 (중)|초밥 모둠 12p|Pad thai")),
    Category("fashion", 0.15, 69_000, 0.7, _words(
        "오버핏 후드티|와이드 데님 팬츠|린넨 셔츠|Leather sneakers|Wool coat|니트 가디건"
        "|Canvas tote bag|Running shorts|캐시미어 머플러|Chelsea boots")),
    Category("electronics", 0.08, 280_000, 0.9, _words(
        "무선 이어폰|Wireless earbuds|USB-C 충전기 65W|기계식 키보드|4K monitor 27\"|로봇청소기"
        "|Smart watch|외장 SSD 1TB|Noise cancelling headphones|태블릿 케이스")),
    Category("grocery", 0.14, 42_000, 0.6, _words(
        "유기농 계란 30구|제주 감귤 5kg|한우 등심 500g|Greek yogurt 6-pack|생수 2L x 12"
        "|Organic bananas|햇반 24개입|샐러드 정기배송|Olive oil 1L|김장 김치 3kg")),
    Category("subscription", 0.06, 13_900, 0.25, _words(
        "[정기결제] 프리미엄 멤버십|Monthly plan|Annual plan (1st month)|[정기결제] 음악 스트리밍"
        "|Cloud storage 2TB|[정기결제] 전자책 무제한|Team plan - 5 seats|Pro plan")),
    Category("travel", 0.07, 420_000, 0.8, _words(
        "제주 왕복 항공권|Tokyo round trip|부산 호텔 2박|Seoul city tour|렌터카 3일"
        "|Osaka hotel 3 nights|KTX 서울-부산|Travel insurance|강릉 펜션 1박|Airport limousine")),
    Category("beauty", 0.09, 35_000, 0.6, _words(
        "수분 크림 50ml|선크림 SPF50+|Vitamin C serum|쿠션 팩트 리필|Hair treatment|립틴트 세트"
        "|Cleansing oil 200ml|마스크팩 10매|Perfume 50ml|네일 젤 키트")),
    Category("education", 0.06, 45_000, 0.7, _words(
        "토익 인강 3개월|Python bootcamp|수학 문제집 세트|English speaking class|코딩 테스트 패스"
        "|Online course bundle|한국사 능력검정 교재|Piano lessons x4")),
)  # fmt: skip

# Korean surnames with their approximate population shares (%), and common given names.
_KO_SURNAMES = _words("김|이|박|최|정|강|조|윤|장|임|한|오|서|신|권|황|안|송|류|홍")
_KO_SURNAME_WEIGHTS = (21.5, 14.7, 8.4, 4.7, 4.3, 2.4, 2.1, 2.1, 2.0, 1.7,
                       1.5, 1.5, 1.5, 1.5, 1.4, 1.4, 1.4, 1.4, 1.1, 1.1)  # fmt: skip
_KO_GIVEN = _words(
    "민준|서연|지우|서준|하은|도윤|지민|예준|수아|시우|지호|하윤|주원|지유|현우|채원|은서|건우"
    "|민서|유진|영수|영희|정훈|미경|상철|혜진|성민|수빈|동현|지현"
)
_EN_FIRST = _words(
    "James|Emma|Olivia|Liam|Noah|Sophia|Mia|Ethan|Ava|Lucas|Minji|Jiwon|Hana|Daniel|Grace"
    "|Yuki|Kenji|Sarah|David|Chloe"
)
_EN_LAST = _words(
    "Kim|Lee|Park|Choi|Smith|Johnson|Brown|Tanaka|Sato|Garcia|Nguyen|Wilson|Jung|Kang"
    "|Miller|Davis|Yoon|Suzuki|Chen|Taylor"
)

_ALPHABET = np.frombuffer(b"0123456789abcdefghjkmnpqrstvwxyz", dtype=np.uint8)  # Crockford-ish
_DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Rates are probabilities per transaction (or per event for
    duplicates); every one of them may be 0."""

    transactions: int = 100_000  # approvals over the whole window
    merchants: int = 200
    days: int = 30
    start: datetime = datetime(2026, 1, 1, tzinfo=ZoneInfo("Asia/Seoul"))
    seed: int = 0
    first_seq: int = 0  # payments are numbered from here: continue another run's ids
    timezone: str = "Asia/Seoul"  # whose daily rhythm approvals follow
    merchant_skew: float = 1.1  # Zipf exponent of merchant volumes
    global_merchant_rate: float = 0.1  # merchants that also take USD and JPY
    cancel_rate: float = 0.08  # payments canceled at least once
    # Of canceled payments: full cancel; partial; partial then full; two partials.
    cancel_scenarios: tuple[float, float, float, float] = (0.62, 0.24, 0.09, 0.05)
    cancel_delay_median_h: float = 20.0  # lognormal; clipped to [min, max]
    cancel_delay_min_h: float = 1.0
    cancel_delay_max_h: float = 24.0 * 28
    duplicate_rate: float = 0.01  # events redelivered once more (same id and payload)
    out_of_order_rate: float = 0.02  # multi-version payments with one version emitted late
    drain: bool = True  # also emit events that fall after the window (late cancellations)

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError("start must be timezone-aware")
        if self.transactions < 0 or self.merchants < 1 or self.days < 1 or self.first_seq < 0:
            raise ValueError("transactions, first_seq ≥ 0, merchants and days ≥ 1 are required")
        for name in ("cancel_rate", "duplicate_rate", "out_of_order_rate", "global_merchant_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if len(self.cancel_scenarios) != 4 or sum(self.cancel_scenarios) <= 0:
            raise ValueError("cancel_scenarios needs four non-negative weights")

    @property
    def start_us(self) -> int:
        return _to_us(self.start)

    def day_start(self, day: int) -> datetime:
        return (self.start + timedelta(days=day)).astimezone(UTC)


# --- columns of one block of events ----------------------------------------------------

_EVENT_FIELDS = (
    "seq", "merchant", "method", "card", "last4", "currency", "amount", "approved",
    "order", "customer", "version", "occurred", "canceled", "status", "etype", "emit",
)  # fmt: skip


@dataclass
class EventBlock:
    """Events as parallel numpy columns (codes, not strings); see :meth:`to_table`."""

    cols: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cols["seq"]) if self.cols else 0

    def take(self, index: np.ndarray) -> EventBlock:
        return EventBlock({k: v[index] for k, v in self.cols.items()})

    @staticmethod
    def concat(blocks: Sequence[EventBlock]) -> EventBlock:
        blocks = [b for b in blocks if len(b)]
        if not blocks:
            return EventBlock()
        return EventBlock({k: np.concatenate([b.cols[k] for b in blocks]) for k in _EVENT_FIELDS})


class PaymentGenerator:
    """The vectorised core. Cheap to build; every method is deterministic."""

    def __init__(self, config: GeneratorConfig, spec: DatasourceSpec | None = None) -> None:
        self.config = config
        self.spec = spec or payments_spec()
        self.schema = arrow_schema(self.spec)
        self._salt = np.uint64((config.seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**64)
        rng = np.random.default_rng([config.seed, 0x4D45])
        n = config.merchants
        ranks = rng.permutation(n)  # merchant i has volume rank ranks[i]
        weights = 1.0 / np.power(ranks + 1.0, config.merchant_skew)
        self.merchant_p = weights / weights.sum()
        self.merchant_ids = [f"mch_{i:05d}" for i in range(n)]
        shares = np.array([c.share for c in CATEGORIES])
        self.merchant_category = rng.choice(len(CATEGORIES), size=n, p=shares / shares.sum())
        is_global = rng.random(n) < config.global_merchant_rate
        self.merchant_usd = np.where(is_global, rng.uniform(0.2, 0.5, n), 0.0)
        self.merchant_jpy = np.where(is_global, rng.uniform(0.05, 0.2, n), 0.0)
        self.customers = _customer_pool(rng, 6_000)
        self.orders, self.order_offset, self.order_count = _order_pool()
        self.day_counts = self._day_counts()
        self.day_seq = config.first_seq + np.concatenate([[0], np.cumsum(self.day_counts)])
        tz = ZoneInfo(config.timezone)
        self._tz_offset_us = [
            int(config.day_start(d).astimezone(tz).utcoffset().total_seconds()) * US  # type: ignore[union-attr]
            for d in range(config.days)
        ]

    # --- volumes --------------------------------------------------------------------

    def _day_counts(self) -> np.ndarray:
        cfg = self.config
        zone = ZoneInfo(cfg.timezone)
        weekdays = np.array([cfg.day_start(d).astimezone(zone).weekday() for d in range(cfg.days)])
        growth = 1.0 + 0.15 * np.arange(cfg.days) / max(cfg.days, 1)
        weight = _WEEKDAY[weekdays] * growth
        exact = cfg.transactions * weight / weight.sum()
        counts: np.ndarray = np.floor(exact).astype(np.int64)
        short = cfg.transactions - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        return counts

    # --- one day ----------------------------------------------------------------------

    def approvals(self, day: int) -> EventBlock:
        """The day's approvals (version 1), in approval-time order."""
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, 1, day, cfg.first_seq])
        n = int(self.day_counts[day])
        seq = np.arange(self.day_seq[day], self.day_seq[day] + n, dtype=np.int64)
        day_start = _to_us(cfg.day_start(day))
        local_midnight = day_start + self._tz_offset_us[day]
        hour = rng.choice(24, size=n, p=_HOURLY / _HOURLY.sum())
        # Local hour h of this day, relative to the window's start (which need not be midnight).
        local_start_hour = (local_midnight // HOUR_US) % 24
        offset_h = (hour - local_start_hour) % 24
        within = rng.integers(0, HOUR_US // 1000, size=n) * 1000  # millisecond precision
        approved = day_start + offset_h * HOUR_US + within
        order = np.argsort(approved, kind="stable")
        approved = approved[order]
        merchant = rng.choice(cfg.merchants, size=n, p=self.merchant_p)
        method = rng.choice(len(METHODS), size=n, p=METHOD_WEIGHTS)
        card = np.where(
            method == 0, rng.choice(len(CARD_COMPANIES), size=n, p=CARD_WEIGHTS), -1
        ).astype(np.int8)
        last4 = np.where(method == 0, rng.integers(0, 10_000, size=n), -1).astype(np.int16)
        u = rng.random(n)
        usd, jpy = self.merchant_usd[merchant], self.merchant_jpy[merchant]
        currency = np.where(u < usd, 1, np.where(u < usd + jpy, 2, 0)).astype(np.int8)
        category = self.merchant_category[merchant]
        medians = np.array([c.median_krw for c in CATEGORIES])[category]
        sigmas = np.array([c.sigma for c in CATEGORIES])[category]
        krw = np.clip(medians * np.exp(sigmas * rng.standard_normal(n)), 1_000, 2_000_000)
        amount = _price(krw, currency)
        pick = rng.random(n)
        order_idx = self.order_offset[category] + (pick * self.order_count[category]).astype(
            np.int64
        )
        customer = rng.integers(0, len(self.customers), size=n)
        emit = approved + rng.integers(5, 2_000, size=n) * 1000  # published a moment later
        return EventBlock(
            {
                "seq": seq,
                "merchant": merchant.astype(np.int32),
                "method": method.astype(np.int8),
                "card": card,
                "last4": last4,
                "currency": currency,
                "amount": amount,
                "approved": approved,
                "order": order_idx.astype(np.int32),
                "customer": customer.astype(np.int32),
                "version": np.ones(n, dtype=np.int32),
                "occurred": approved.copy(),
                "canceled": np.zeros(n, dtype=np.int64),
                "status": np.zeros(n, dtype=np.int8),
                "etype": np.zeros(n, dtype=np.int8),
                "emit": emit,
            }
        )

    def day_events(self, day: int) -> EventBlock:
        """The day's approvals with every later event of those payments (cancellations,
        duplicates, reordered deliveries), unsorted; ``emit`` says when each is sent."""
        cfg = self.config
        base = self.approvals(day)
        rng = np.random.default_rng([cfg.seed, 2, day, cfg.first_seq])
        n = len(base)
        canceled = np.flatnonzero(rng.random(n) < cfg.cancel_rate)
        weights = np.asarray(cfg.cancel_scenarios, dtype=float)
        scenario = rng.choice(4, size=len(canceled), p=weights / weights.sum())
        amount = base.cols["amount"][canceled]
        step = _STEP[base.cols["currency"][canceled]]
        # Too small to split into two priced parts: a partial is impossible, cancel fully.
        scenario = np.where(amount < 4 * step, 0, scenario)
        delay1 = self._delays(rng, len(canceled))
        first = base.take(canceled)
        first_partial = scenario > 0
        part1 = _partial(rng, amount, step, 0.15, 0.6)
        first.cols["canceled"] = np.where(first_partial, part1, amount)
        first.cols["occurred"] = first.cols["approved"] + delay1
        first.cols["version"] = first.cols["version"] + 1
        second_idx = np.flatnonzero(scenario >= 2)
        second = first.take(second_idx)
        already = second.cols["canceled"]
        rest = second.cols["amount"] - already
        more = _partial(rng, rest, step[second_idx], 0.2, 0.7)
        # A second partial needs room for one more priced part; otherwise it cancels the rest.
        finish = (scenario[second_idx] == 2) | (rest < 2 * step[second_idx])
        second.cols["canceled"] = np.where(
            finish, second.cols["amount"], already + np.minimum(more, rest - step[second_idx])
        )
        second.cols["occurred"] = second.cols["occurred"] + self._delays(rng, len(second), 0.7)
        second.cols["version"] = second.cols["version"] + 1
        for block in (first, second):
            full = block.cols["canceled"] >= block.cols["amount"]
            block.cols["status"] = np.where(full, CANCELED, PARTIAL).astype(np.int8)
            block.cols["etype"] = np.where(full, CANCELED_EVT, PARTIAL_EVT).astype(np.int8)
            block.cols["emit"] = block.cols["occurred"] + rng.integers(5, 3_000, len(block)) * 1000
        events = EventBlock.concat([base, first, second])
        self._reorder(rng, events)
        return self._duplicate(rng, events)

    def _delays(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        cfg = self.config
        hours = cfg.cancel_delay_median_h * scale * np.exp(1.3 * rng.standard_normal(n))
        hours = np.clip(hours, cfg.cancel_delay_min_h, cfg.cancel_delay_max_h)
        return (hours * HOUR_US / 1000).astype(np.int64) * 1000

    def _reorder(self, rng: np.random.Generator, events: EventBlock) -> None:
        """Emit one version of some multi-version payments after its successor."""
        cfg = self.config
        if not cfg.out_of_order_rate or not len(events):
            return
        c = events.cols
        order = np.lexsort((c["version"], c["seq"]))
        seq, emit = c["seq"][order], c["emit"][order]
        has_next = np.flatnonzero(seq[:-1] == seq[1:])  # positions with a successor
        if not len(has_next):
            return
        # One candidate version per payment: the last position of each run picks it.
        candidate_seq, first_pos = np.unique(seq[has_next], return_index=True)
        counts = np.diff(np.append(first_pos, len(has_next)))
        chosen = first_pos + (rng.random(len(candidate_seq)) * counts).astype(np.int64)
        chosen = chosen[rng.random(len(chosen)) < cfg.out_of_order_rate]
        pos = has_next[chosen]
        late = emit[pos + 1] + rng.integers(1, 120_000, size=len(pos)) * 1000
        c["emit"][order[pos]] = late

    def _duplicate(self, rng: np.random.Generator, events: EventBlock) -> EventBlock:
        cfg = self.config
        if not cfg.duplicate_rate or not len(events):
            return events
        again = np.flatnonzero(rng.random(len(events)) < cfg.duplicate_rate)
        dup = events.take(again)
        # Redelivery after a consumer restart or a producer retry: seconds to an hour later.
        wait = np.clip(30 * np.exp(1.5 * rng.standard_normal(len(dup))), 0.05, 3600)
        dup.cols["emit"] = dup.cols["emit"] + (wait * 1000).astype(np.int64) * 1000
        return EventBlock.concat([events, dup])

    # --- emission order -----------------------------------------------------------------

    def emission_blocks(self) -> Iterator[EventBlock]:
        """Every event in emission order, one block per simulated day (plus the tail)."""
        pending = EventBlock()
        for day in range(self.config.days):
            pending = EventBlock.concat([pending, self.day_events(day)])
            if not len(pending):
                continue  # a quiet day: nothing approved yet, nothing pending
            cutoff = _to_us(self.config.day_start(day + 1))
            due = pending.cols["emit"] < cutoff
            if due.any():
                yield _sorted(pending.take(np.flatnonzero(due)))
            pending = pending.take(np.flatnonzero(~due))
        if self.config.drain and len(pending):
            yield _sorted(pending)

    # --- conversion -------------------------------------------------------------------

    def to_table(self, events: EventBlock) -> pa.Table:
        """Events as an Arrow table in the base schema (without ``_deleted``)."""
        c = events.cols
        n = len(events)
        seq = c["seq"].astype(np.uint64)
        event_key = seq * np.uint64(4) + c["version"].astype(np.uint64)
        is_card = c["card"] >= 0
        columns: dict[str, pa.Array] = {
            "event_id": _ids("evt_", _mix(event_key, self._salt ^ np.uint64(0xE7))),
            "event_type": _take(EVENT_TYPES, c["etype"]),
            "occurred_at": _ts(c["occurred"]),
            "txn_id": _ids("txn_", _mix(seq, self._salt)),
            "version": pa.array(c["version"].astype(np.int64)),
            "merchant_id": _take(self.merchant_ids, c["merchant"]),
            "order_id": _ids("ord_", _mix(seq, self._salt ^ np.uint64(0x0D))),
            "order_name": _take(self.orders, c["order"]),
            "customer_name": _take(self.customers, c["customer"]),
            "method": _take(METHODS, c["method"]),
            "card_company": _take(CARD_COMPANIES, c["card"], null=~is_card),
            "card_last4": pc.if_else(
                pa.array(is_card), _digits(c["last4"], 4), pa.scalar(None, pa.string())
            ),
            "currency": _take(CURRENCIES, c["currency"]),
            "amount": pa.array(c["amount"].astype(np.int64)),
            "canceled_amount": pa.array(c["canceled"].astype(np.int64)),
            "status": _take(STATUSES, c["status"]),
            "approved_at": _ts(c["approved"]),
        }
        assert all(len(v) == n for v in columns.values())
        return pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)


# --- public entry points --------------------------------------------------------------


def generate_events(config: GeneratorConfig) -> Iterator[dict[str, Any]]:
    """Event dicts in wire form (times as RFC 3339 strings), in emission order."""
    gen = PaymentGenerator(config)
    times = [f.name for f in gen.schema if pa.types.is_timestamp(f.type)]
    for block in gen.emission_blocks():
        table = gen.to_table(block)
        for start in range(0, table.num_rows, 8192):
            rows = table.slice(start, 8192).to_pylist()
            for row in rows:
                for name in times:
                    row[name] = rfc3339(row[name])
                yield row


def generate_tables(config: GeneratorConfig, batch_rows: int = 10_000) -> Iterator[pa.Table]:
    """The same stream as :func:`generate_events`, as Arrow tables of ``batch_rows`` rows
    (the last may be shorter) in the base schema without ``_deleted``."""
    gen = PaymentGenerator(config)
    yield from _rebatch((gen.to_table(b) for b in gen.emission_blocks()), batch_rows)


def approval_tables(
    config: GeneratorConfig, batch_rows: int = 10_000, days: Sequence[int] | None = None
) -> Iterator[pa.Table]:
    """Approvals only (every row a new key), in approval-time order: a stream of new
    payments arriving in the active partition."""
    gen = PaymentGenerator(config)
    chosen = range(config.days) if days is None else days
    yield from _rebatch((gen.to_table(gen.approvals(d)) for d in chosen), batch_rows)


def cancellations_for(
    current: pa.Table,
    occurred_at: datetime | np.ndarray | int,
    *,
    seed: int = 0,
    full_share: float = 0.6,
) -> pa.Table:
    """The next cancellation event of each payment in ``current`` (rows in the base
    schema, holding each payment's current state; fully canceled ones are skipped).

    Each result row keeps the payment's ``approved_at`` and every other attribute, has
    ``version + 1``, a fresh ``event_id``, ``occurred_at`` as given (an aware datetime,
    or epoch microseconds, one per row or for all) and a cumulative ``canceled_amount``:
    the rest in full with probability ``full_share``, else part of it.
    """
    amount = current.column("amount").to_numpy(zero_copy_only=False).astype(np.int64)
    already = current.column("canceled_amount").to_numpy(zero_copy_only=False).astype(np.int64)
    open_ = np.flatnonzero(already < amount)
    table = current.take(pa.array(open_, pa.int64()))
    amount, already = amount[open_], already[open_]
    n = table.num_rows
    rng = np.random.default_rng([seed, 3, n])
    codes = pc.index_in(table.column("currency"), value_set=pa.array(CURRENCIES)).fill_null(0)
    step = _STEP[codes.to_numpy(zero_copy_only=False).astype(np.intp)]
    rest = amount - already
    part = np.minimum(_partial(rng, rest, step, 0.2, 0.7), rest - step)
    full = (rng.random(n) < full_share) | (rest < 2 * step) | (part <= 0)
    canceled = np.where(full, amount, already + part)
    if isinstance(occurred_at, datetime):
        occurred = np.full(n, _to_us(occurred_at), dtype=np.int64)
    else:
        given = np.asarray(occurred_at, dtype=np.int64)
        if given.ndim and len(given) != len(current):
            raise ValueError("occurred_at needs one value, or one per row of current")
        occurred = np.broadcast_to(given, (len(current),))[open_]
    status = np.where(full, CANCELED, PARTIAL)
    salt = np.uint64((seed * 0xD1B54A32D192ED03 + 0xA5) % 2**64)
    ids = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64).astype(np.uint64)
    updates = {
        "event_id": _ids("evt_", _mix(ids, salt)),
        "event_type": _take(EVENT_TYPES, np.where(full, CANCELED_EVT, PARTIAL_EVT)),
        "occurred_at": _ts(occurred),
        "version": pc.add(table.column("version"), 1),
        "canceled_amount": pa.array(canceled, pa.int64()),
        "status": _take(STATUSES, status),
    }
    for name, values in updates.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, pa.field(name, values.type), values)
    return table


# --- helpers -------------------------------------------------------------------------


@cache
def payments_spec() -> DatasourceSpec:
    from tally.specs import SpecRegistry, builtin_spec_paths

    return SpecRegistry.load(builtin_spec_paths()).get("payments")


def arrow_schema(spec: DatasourceSpec) -> pa.Schema:
    """The rows of ``spec`` as every backend stores them."""
    from storage.schema import row_schema

    return row_schema(spec)


def rfc3339(value: datetime) -> str:
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def _to_us(value: datetime) -> int:
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US + delta.microseconds


def _sorted(block: EventBlock) -> EventBlock:
    c = block.cols
    return block.take(np.lexsort((c["version"], c["seq"], c["emit"])))


def _rebatch(tables: Iterator[pa.Table], batch_rows: int) -> Iterator[pa.Table]:
    if batch_rows < 1:
        raise ValueError("batch_rows must be ≥ 1")
    buffer: list[pa.Table] = []
    held = 0
    for table in tables:
        buffer.append(table)
        held += table.num_rows
        if held < batch_rows:
            continue
        merged = pa.concat_tables(buffer)
        start = 0
        while merged.num_rows - start >= batch_rows:
            yield merged.slice(start, batch_rows).combine_chunks()
            start += batch_rows
        buffer, held = [merged.slice(start)], merged.num_rows - start
    if held:
        yield pa.concat_tables(buffer).combine_chunks()


def _price(krw: np.ndarray, currency: np.ndarray) -> np.ndarray:
    """Won → minor units of each currency, rounded like real price tags."""
    minor = krw / _KRW_PER_MINOR[currency]
    step = _STEP[currency]
    price = np.round(minor / step).astype(np.int64) * step
    usd = currency == 1
    # USD prices end in .99 or .00 ($24.99), never in arbitrary cents.
    dollars = np.maximum(np.round(minor / 100).astype(np.int64), 1)
    price = np.where(usd, np.where(dollars % 3 == 0, dollars * 100, dollars * 100 - 1), price)
    out: np.ndarray = np.maximum(price, _MIN_AMOUNT[currency])
    return out


def _partial(
    rng: np.random.Generator, amount: np.ndarray, step: np.ndarray, lo: float, hi: float
) -> np.ndarray:
    """A part of ``amount`` in whole ``step`` units, at least one step and one step short."""
    frac = rng.uniform(lo, hi, len(amount))
    part = np.floor(amount * frac / step).astype(np.int64) * step
    out: np.ndarray = np.clip(part, step, np.maximum(amount - step, step))
    return out


def _mix(values: np.ndarray, salt: np.uint64) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64, so distinct inputs stay distinct."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + salt
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _fixed_strings(data: np.ndarray) -> pa.Array:
    """An (n, width) uint8 matrix → a string array of n fixed-width values."""
    n, width = data.shape
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(data))]
    )


def _ids(prefix: str, values: np.ndarray) -> pa.Array:
    """``prefix`` + 13 base-32 characters of a uint64 (all 64 bits, so no collisions)."""
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    n = len(values)
    data = np.empty((n, len(head) + 13), dtype=np.uint8)
    data[:, : len(head)] = head
    shifts = np.arange(12, -1, -1, dtype=np.uint64) * np.uint64(5)
    digits = (values[:, None] >> shifts[None, :]) & np.uint64(31)
    data[:, len(head) :] = _ALPHABET[digits.astype(np.intp)]
    return _fixed_strings(data)


def _digits(values: np.ndarray, width: int) -> pa.Array:
    v = np.maximum(values.astype(np.int64), 0)
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return _fixed_strings(_DIGITS[(v[:, None] // powers[None, :]) % 10])


def _take(values: Sequence[str], codes: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
    index = pa.array(np.maximum(codes, 0).astype(np.int32), mask=null)
    return pc.take(pa.array(list(values), pa.string()), index)


def _ts(micros: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(micros, dtype=np.int64)).cast(TS)


def _customer_pool(rng: np.random.Generator, size: int) -> list[str]:
    """Mostly Korean names (surname-weighted), some English or romanised ones."""
    names: list[str] = []
    sur_p = np.array(_KO_SURNAME_WEIGHTS) / sum(_KO_SURNAME_WEIGHTS)
    for _ in range(size):
        if rng.random() < 0.78:
            surname = _KO_SURNAMES[rng.choice(len(_KO_SURNAMES), p=sur_p)]
            names.append(surname + _KO_GIVEN[rng.integers(len(_KO_GIVEN))])
        else:
            first = _EN_FIRST[rng.integers(len(_EN_FIRST))]
            names.append(f"{first} {_EN_LAST[rng.integers(len(_EN_LAST))]}")
    return names


def _order_pool() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per category: each product alone and as the first of a multi-item order."""
    names: list[str] = []
    offsets, counts = [], []
    for category in CATEGORIES:
        offsets.append(len(names))
        for product in category.products:
            names.append(product)
            names.append(product)  # single-item orders are the most common
            if any("가" <= ch <= "힣" for ch in product):
                names.extend(f"{product} 외 {k}건" for k in (1, 2, 3))
            else:
                names.extend(f"{product} and {k} more" for k in (1, 2))
        counts.append(len(names) - offsets[-1])
    return names, np.array(offsets, dtype=np.int64), np.array(counts, dtype=np.int64)
