"""schemathesis against the live server's OpenAPI document: generated requests (valid
and not) to every operation, with a merchant's key, must never get a 5xx, and every
error must come as the JSON error body."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.query_api.conftest import Api


def test_no_generated_request_gets_a_5xx(api: Api) -> None:
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    headers = {"Authorization": f"Bearer {api.keys['m1']}"}
    operations = []
    for result in schema.get_all_operations():
        assert not isinstance(result, schemathesis.core.result.Err), result
        operations.append(result.ok())
    assert {op.path for op in operations} >= {
        "/v1/sales",
        "/v1/transactions",
        "/v1/transactions/{txn_id}",
        "/v1/sql",
    }
    failures: list[str] = []
    for op in operations:
        _exercise(op, api.url, headers, failures)
    assert not failures, failures[:5]


def _exercise(operation: Any, url: str, headers: dict[str, str], failures: list[str]) -> None:
    """Generated cases for one operation (a function of its own, so the hypothesis
    test it builds binds this operation)."""

    @given(case=operation.as_strategy())
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def exercise(case: Any) -> None:
        response = case.call(base_url=url, headers=headers, timeout=30)
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} {case.query}: {response.text[:200]}"
            )
        elif response.status_code >= 400:
            body = response.json()
            assert body["error"]["code"] and body["error"]["message"], response.text

    exercise()
