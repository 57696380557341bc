"""Production search on OpenSearch (the ``opensearch-py`` client), one index per
datasource. Everything but the client is shared with Elasticsearch
(:mod:`search.cluster`); the ``elasticsearch`` client cannot be used here, its product
check refuses any server that is not Elasticsearch.

The client is used as a transport (connection pool, retries, auth): requests go
through ``transport.perform_request``; its ``TransportError`` carries the status and
the decoded body, which the shared code reads like any other answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from opensearchpy import OpenSearch
from opensearchpy.exceptions import (
    ConnectionError as OpenSearchConnectionError,
)
from opensearchpy.exceptions import (
    ConnectionTimeout,
    SerializationError,
    SSLError,
    TransportError,
)

from search.cluster import ClusterIndex
from search.protocol import SearchCapabilities
from tally.errors import ConfigError, SearchError, SearchUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec

CAPABILITIES = SearchCapabilities(
    "opensearch", external_versions=True, shards_by_source_partition=False, routes_by_tenant=True
)
_NDJSON = {"content-type": "application/x-ndjson"}


class OpenSearchIndex(ClusterIndex):
    capabilities = CAPABILITIES
    product = "OpenSearch"

    def __init__(
        self,
        settings: Settings,
        spec: DatasourceSpec,
        *,
        readonly: bool = False,  # a cluster is shared by design: nothing to open read-only
        request_timeout: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(settings, spec)
        cfg = settings.search
        kwargs: dict[str, Any] = {
            "timeout": request_timeout,
            "max_retries": max_retries,
            "retry_on_timeout": True,  # safe: every write is idempotent by version
        }
        if cfg.user is not None:
            password = cfg.password
            kwargs["http_auth"] = (
                cfg.user,
                password.get_secret_value() if password is not None else "",
            )
        hosts = [h.strip() for h in cfg.url.split(",") if h.strip()]
        try:
            self.client = OpenSearch(hosts, **kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"search.url: {exc}") from exc

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        lines: list[dict[str, Any]] | None = None,
    ) -> tuple[int, Any]:
        payload: Any = body
        headers = None
        if lines is not None:
            payload = b"".join(orjson.dumps(line) + b"\n" for line in lines).decode()
            headers = _NDJSON
        try:
            reply = self.client.transport.perform_request(
                method, path, params=params, body=payload, headers=headers
            )
        except SSLError as exc:  # certificate or protocol setup: retrying will not fix it
            raise SearchError(f"{method} {path}: TLS error: {exc}") from exc
        except (OpenSearchConnectionError, ConnectionTimeout) as exc:
            raise SearchUnavailable(f"{method} {path}: OpenSearch unreachable: {exc}") from exc
        except SerializationError as exc:
            raise SearchError(f"{method} {path}: unreadable response: {exc}") from exc
        except TransportError as exc:
            status = exc.status_code if isinstance(exc.status_code, int) else 500
            return status, exc.info
        return 200, reply

    def close(self) -> None:
        self.client.close()
