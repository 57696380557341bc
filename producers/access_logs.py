"""Generated access logs of merchants' API integrations (the ``access_logs`` spec): one
event per request, for the same merchants the payment generator makes, with a skew
toward the busiest, realistic endpoints, status codes and a long-tailed latency.

Deterministic for a seed; ``start`` to ``start + days`` in time order, so a stream of
them is a stream of what a gateway would publish as it happens (no versions beyond 1:
a request is logged once).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from producers.generate import GeneratorConfig, PaymentGenerator, rfc3339

ENDPOINTS = (
    ("POST", "/v1/payments/confirm", 0.35),
    ("GET", "/v1/payments/{id}", 0.25),
    ("POST", "/v1/payments/{id}/cancel", 0.08),
    ("GET", "/v1/transactions", 0.12),
    ("POST", "/v1/billing/authorizations", 0.06),
    ("GET", "/v1/settlements", 0.04),
    ("POST", "/v1/webhooks/test", 0.02),
    ("DELETE", "/v1/billing/{key}", 0.01),
    ("PUT", "/v1/payments/{id}/escrow", 0.07),
)
# status code, share, the gateway's error code (None for success)
OUTCOMES = (
    (200, 0.90, None),
    (400, 0.04, "INVALID_REQUEST"),
    (401, 0.01, "UNAUTHORIZED_KEY"),
    (404, 0.02, "NOT_FOUND_PAYMENT"),
    (409, 0.01, "ALREADY_PROCESSED_PAYMENT"),
    (429, 0.01, "TOO_MANY_REQUESTS"),
    (500, 0.007, "FAILED_INTERNAL_SYSTEM_PROCESSING"),
    (504, 0.003, "PROVIDER_TIMEOUT"),
)


@dataclass(frozen=True)
class AccessLogConfig:
    requests: int
    payments: GeneratorConfig  # whose merchants call the API
    seed: int = 0


def generate_access_logs(config: AccessLogConfig) -> Iterator[dict[str, Any]]:
    """``config.requests`` access-log events, oldest first, over the payment
    generator's days and merchants."""
    rng = random.Random(config.seed)
    merchants = PaymentGenerator(config.payments)
    ids, weights = merchants.merchant_ids, list(merchants.merchant_p)
    start = config.payments.day_start(0).astimezone(UTC)
    span_us = config.payments.days * 86_400_000_000
    step = span_us / max(1, config.requests)
    endpoint_w = [w for _m, _e, w in ENDPOINTS]
    outcome_w = [w for _s, w, _c in OUTCOMES]
    for i in range(config.requests):
        method, endpoint, _w = rng.choices(ENDPOINTS, endpoint_w)[0]
        status, _share, error = rng.choices(OUTCOMES, outcome_w)[0]
        at = start + timedelta(microseconds=int(i * step + rng.random() * step))
        request_id = f"req_{config.seed:02d}{i:010d}"
        yield {
            "event_id": f"{request_id}-1",
            "request_id": request_id,
            "version": 1,
            "merchant_id": rng.choices(ids, weights)[0],
            "requested_at": rfc3339(at),
            "http_method": method,
            "endpoint": endpoint,
            "status_code": status,
            "is_error": int(status >= 500 or status == 429),
            "latency_ms": _latency(rng, status),
            "error_code": error,
        }


def _latency(rng: random.Random, status: int) -> int:
    """Log-normal around 80 ms; a gateway timeout waits out its 10 s."""
    if status == 504:
        return 10_000
    return max(1, int(rng.lognormvariate(4.4, 0.6)))
