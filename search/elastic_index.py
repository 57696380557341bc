"""Production search on Elasticsearch (the ``elasticsearch`` 9 client), one index per
datasource. Everything but the client is shared with OpenSearch (:mod:`search.cluster`).

The client is used as a transport (connection pool, retries, auth, its product check):
requests go through ``perform_request``, which sends what its API methods send,
``compatible-with=9`` media types included.
"""

from __future__ import annotations

from typing import Any

from elastic_transport import BaseNode, ConnectionTimeout, TlsError
from elastic_transport import ConnectionError as TransportConnectionError
from elasticsearch import ApiError, Elasticsearch, SerializationError

from search.cluster import ANALYZER, META_SUFFIX, ClusterIndex
from search.protocol import SearchCapabilities
from tally.errors import ConfigError, SearchError, SearchUnavailable
from tally.settings import Settings
from tally.specs import DatasourceSpec

__all__ = ["ANALYZER", "CAPABILITIES", "META_SUFFIX", "ElasticIndex"]

CAPABILITIES = SearchCapabilities(
    "elasticsearch",
    external_versions=True,
    shards_by_source_partition=False,
    routes_by_tenant=True,
)
_JSON = {"accept": "application/json", "content-type": "application/json"}
_NDJSON = {"accept": "application/json", "content-type": "application/x-ndjson"}


class ElasticIndex(ClusterIndex):
    """``node_class`` selects the HTTP node implementation of ``elastic_transport``
    (default: the client's own); tests use it to talk to OpenSearch-compatible servers.
    """

    capabilities = CAPABILITIES
    product = "Elasticsearch"

    def __init__(
        self,
        settings: Settings,
        spec: DatasourceSpec,
        *,
        readonly: bool = False,  # a cluster is shared by design: nothing to open read-only
        node_class: type[BaseNode] | None = None,
        request_timeout: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        super().__init__(settings, spec)
        cfg = settings.search
        kwargs: dict[str, Any] = {
            "request_timeout": request_timeout,
            "max_retries": max_retries,
            "retry_on_timeout": True,  # safe: every write is idempotent by version
        }
        if node_class is not None:
            kwargs["node_class"] = node_class
        if cfg.user is not None:
            password = cfg.password
            kwargs["basic_auth"] = (
                cfg.user,
                password.get_secret_value() if password is not None else "",
            )
        hosts = [h.strip() for h in cfg.url.split(",") if h.strip()]
        try:
            self.client = Elasticsearch(hosts, **kwargs)
        except ValueError as exc:
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
        try:
            resp = self.client.perform_request(
                method,
                path,
                params=params,
                headers=_NDJSON if lines is not None else _JSON,
                body=lines if lines is not None else body,
            )
        except ApiError as exc:
            return exc.meta.status, exc.body
        except TlsError as exc:  # certificate or protocol setup: retrying will not fix it
            raise SearchError(f"{method} {path}: TLS error: {exc}") from exc
        except (TransportConnectionError, ConnectionTimeout) as exc:
            raise SearchUnavailable(f"{method} {path}: Elasticsearch unreachable: {exc}") from exc
        except SerializationError as exc:
            raise SearchError(f"{method} {path}: unreadable response: {exc}") from exc
        return resp.meta.status, resp.body

    def close(self) -> None:
        self.client.close()
