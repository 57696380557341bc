"""One root exception for the whole platform.

Every error a driver raises is translated at the boundary where it happens
(``raise ... from exc``) into one of these, and each carries ``transient`` so that
ingestion knows whether to retry with backoff (transient) or to dead-letter / stop
(terminal). ``code`` is the stable machine-readable name used in CLI JSON and HTTP
error bodies.
"""

from __future__ import annotations


class TallyError(Exception):
    """Root of every error Tally raises on purpose."""

    code = "tally_error"
    transient = False
    exit_code = 1  # what the CLI exits with

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(TallyError):
    """Settings or a datasource spec are invalid; names the file, key and problem."""

    code = "config_error"


class SpecError(ConfigError):
    code = "spec_error"


class UnknownDatasource(TallyError):
    code = "unknown_datasource"


class StoreError(TallyError):
    """The OLAP store refused or failed an operation."""

    code = "store_error"


class StoreBusy(StoreError):
    """Another process holds the catalog write lock longer than we waited; retry."""

    code = "store_busy"
    transient = True


class StoreUnavailable(StoreError):
    """Disk or engine failure that may clear by itself; retry."""

    code = "store_unavailable"
    transient = True


class StoreFull(StoreError):
    """The disk (or the database's size limit) holding the catalog is full.

    Terminal: retrying cannot help until an operator frees space, so ingestion stops
    with this one-line reason instead of retrying for ever or crashing as a bug."""

    code = "store_full"


class StoreFileError(StoreError):
    """The catalog file cannot be used: an I/O error, a read-only file or directory,
    or a corrupt database. Terminal: an operator must repair it."""

    code = "store_file_error"


class PartitionDamaged(StoreError):
    """A stored partition's files are missing, truncated or altered: what reads it
    fails with this (the server's fault: 503 over HTTP) until ``tally verify --repair``
    rebuilds it from the log. Names the datasource and partitions, never a path."""

    code = "partition_damaged"


class OffsetMismatch(StoreError):
    """A commit's start offsets differ from the catalog's: the writer is a zombie.

    Terminal for that writer: it must re-read its position from the catalog,
    never retry the same batch blindly.
    """

    code = "offset_mismatch"


class PositionMismatch(TallyError):
    """A stored position is not of the log being read: the topic was recreated, the
    cluster is another one, or retention removed what the sink never read. Terminal:
    the partition stops until an operator decides (``tally ingest reset``)."""

    code = "position_mismatch"


class DruidUnavailable(StoreUnavailable):
    """Druid's overlord (or broker) is not configured or did not answer; nothing was
    changed. The CLI exits 2, like an engine that cannot be had."""

    code = "druid_unavailable"
    exit_code = 2


class CompactionConflict(StoreError):
    """Segments chosen for compaction were replaced meanwhile; nothing was changed."""

    code = "compaction_conflict"
    transient = True


class InvalidArgument(TallyError):
    """A caller passed a value that cannot be used (bad partition key, bad range...)."""

    code = "invalid_argument"


class InvalidRow(TallyError):
    """A row does not satisfy its datasource spec (dead-letter material)."""

    code = "invalid_row"


class QueryError(TallyError):
    """A query was rejected or failed in the engine (bad SQL, unknown column...)."""

    code = "query_error"


class RoutingError(TallyError):
    """An aggregate request cannot be answered (unknown dimension, bad range...)."""

    code = "bad_aggregate_request"


class InvalidEvent(TallyError):
    """A message that cannot become a row: undecodable, schema-invalid or unknown.

    Terminal for that message: it goes to the dead-letter topic with this reason."""

    code = "invalid_event"


class BrokerUnavailable(TallyError):
    """Kafka cannot be reached or refused a request that may succeed later."""

    code = "broker_unavailable"
    transient = True


class BrokerError(TallyError):
    """Kafka refused a request for a reason retrying will not fix."""

    code = "broker_error"


class SearchUnavailable(TallyError):
    """The search backend is down or overloaded; retry."""

    code = "search_unavailable"
    transient = True


class SearchError(TallyError):
    """The search backend rejected a request (bad query, bad mapping...)."""

    code = "search_error"


class Unauthorized(TallyError):
    """No API key, or one that is unknown or revoked."""

    code = "unauthorized"


class Forbidden(TallyError):
    """A valid key without the scope the route needs."""

    code = "forbidden"


class NotFound(TallyError):
    """Nothing with that id — or nothing the caller's tenant may see (never says which)."""

    code = "not_found"


class DifferencesFound(TallyError):
    """``tally verify`` found sinks that differ from the log and did not repair them."""

    code = "differences_found"


class EngineUnavailable(TallyError):
    """A local engine cannot be had here: Java or Maven missing, or an artifact that
    cannot be resolved. Nothing was started; the CLI exits 2."""

    code = "engine_unavailable"
    exit_code = 2


class EngineError(TallyError):
    """A local engine was started but failed: it exited, or did not answer in time."""

    code = "engine_error"
