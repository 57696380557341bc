"""One typed, frozen settings object per process.

Precedence (highest first): explicit overrides (CLI flags), ``TALLY_*`` environment
variables, ``tally.toml`` (or ``--config``), defaults. Nested sections use ``__`` in
environment names, e.g. ``TALLY_STORE__GC_GRACE_S=60``. The layers are pydantic-settings
sources, which merge key by key: an environment variable for one key of ``[store]``
leaves the file's other ``[store]`` keys in force.
"""

from __future__ import annotations

import json
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tally.errors import ConfigError

# What a ``Settings(...)`` being built reads beside its keyword arguments: the
# environment always, the config file when load_settings found one, and nothing
# else when it is a handed-over object (see from_handoff).
_config_file: ContextVar[TomlConfigSettingsSource | None] = ContextVar(
    "tally_config_file", default=None
)
_handed_over: ContextVar[bool] = ContextVar("tally_handed_over", default=False)


class StoreSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: str = Field(
        "embedded", description="OLAP backend: a package under storage/ (embedded)"
    )
    gc_grace_s: float = Field(300.0, ge=0, description="keep replaced segment files this long")
    orphan_grace_s: float = Field(
        3600.0, ge=0, description="an unreferenced file older than this is a crash leftover"
    )
    busy_timeout_s: float = Field(60.0, gt=0)
    duckdb_threads: int = Field(2, ge=1)
    duckdb_memory_limit: str = "4GB"
    resident_rollups_mb: int = Field(
        512, ge=0, description="memory a reader may keep summed rollup partitions in"
    )


class IngestSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    partitions: int = Field(6, ge=1, description="partitions of topics `tally topics create` makes")
    batch_max_rows: int = Field(20_000, ge=1)
    batch_max_wait_s: float = Field(
        0.25, gt=0, description="OLAP sink micro-batch linger; ≤1 s freshness"
    )
    search_refresh_s: float = Field(
        0.25,
        gt=0,
        description="search sink micro-batch linger (its refresh interval); each batch "
        "commits a tantivy segment per shard",
    )
    priority: bool = Field(
        True,
        description="a process serving several datasources writes the higher `priority` "
        "first; off, every lane takes its turn as the machine gives it",
    )
    yield_batch_rows: int = Field(
        2_000,
        ge=1,
        description="a lower-priority lane's batch cap while a higher one has work: the "
        "write a critical batch may find in progress is this small",
    )
    yield_max_wait_s: float = Field(
        1.0,
        gt=0,
        description="a lower-priority write waits for the higher lanes at most this long: "
        "it slows down under their backlog, never starves",
    )
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(5.0, gt=0)
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(500, ge=100)
    metrics_port: int | None = Field(None, description="serve Prometheus metrics on this port")
    transaction_timeout_s: float = Field(
        10.0,
        ge=1,
        description="Kafka transaction timeout of the relay sink (engines that ingest from "
        "Kafka): a crashed relay's open transaction blocks its partitions this long at most",
    )


class CompactionSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(1.0, gt=0, description="how often the watcher polls statistics")
    debounce_s: float = Field(
        1.0, ge=0, description="a late-written partition waits until writes were quiet this long"
    )
    max_delay_s: float = Field(
        5.0, ge=0, description="...but is compacted this long after it fragmented at the latest"
    )
    min_merge: int = Field(4, ge=2, description="segments of one size tier before a merge")
    max_merge: int = Field(32, ge=2, description="segments merged at once")
    tier_ratio: float = Field(4.0, gt=1, description="largest/smallest segment within a tier")
    pack_delay_s: float = Field(
        600.0, ge=0, description="cold days of a month are repacked once it was quiet this long"
    )
    pack_max_files: int = Field(8, ge=2, description="...or once the month spans this many files")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="the watcher serves Prometheus metrics on this port"
    )
    max_bytes_per_tick: int = Field(
        1 << 30, gt=0, description="bytes the watcher rewrites per poll at most (bounded work)"
    )
    max_in_flight: int = Field(
        4,
        ge=1,
        description="compactions running at once where the engine runs them as tasks (Druid)",
    )
    task_timeout_s: float = Field(
        600.0, gt=0, description="an engine's compaction task is shut down after this long"
    )
    check_files_s: float = Field(
        30.0, gt=0, description="the watcher checks every segment file's size this often"
    )
    check_digests_s: float = Field(
        3600.0, gt=0, description="...and re-reads every file against its digest this often"
    )
    repair_damaged: bool = Field(
        False,
        description="the watcher rebuilds a damaged partition from the log by itself"
        " (never one the log no longer holds whole)",
    )


class ApiSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    datasource: str = Field("payments", description="the datasource /v1 serves")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(2, ge=1, description="uvicorn worker processes")
    page_max: int = Field(500, ge=1, description="largest page /v1/transactions returns")
    sql_row_limit: int = Field(10_000, ge=1, description="rows /v1/sql returns at most")
    sql_timeout_s: float = Field(10.0, gt=0, description="a /v1/sql query is cancelled after")
    page_refresh_s: float = Field(
        4.0, ge=0.2, description="how often /dashboard and /console refresh while open"
    )
    rate_limit: str = Field(
        "50/second",
        description="requests each API key may make to /v1, summed over the workers, in "
        "`limits` notation ('50/second', '1000/minute', '10/second;300/minute'); 'off' disables",
    )

    @field_validator("rate_limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        from limits import parse_many

        if value.strip().lower() == "off":
            return "off"
        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate like '50/second' (or 'off')") from exc
        return value


class SearchSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["tantivy", "elasticsearch", "opensearch"] = "tantivy"
    # A search cluster's (Elasticsearch or OpenSearch):
    url: str = Field("http://127.0.0.1:9200", description="comma-separated node URLs")
    user: str | None = None
    password: SecretStr | None = None
    index_prefix: str = "tally-"
    shards: int = Field(1, ge=1, description="primary shards of each datasource's index")
    replicas: int | None = Field(None, ge=0, description="replicas (None: the cluster's default)")
    refresh_interval_s: float = Field(
        1.0,
        ge=0,
        description="the engine's own refresh of each index (0: none); a commit refreshes anyway",
    )
    max_result_window: int = Field(
        10_000, ge=1, description="index.max_result_window: hits per search request at most"
    )


class DruidSettings(BaseModel):
    """Where Druid's services answer (``store.backend = "druid"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    broker_url: str | None = Field(None, description="Druid broker, e.g. http://127.0.0.1:8082")
    overlord_url: str | None = Field(
        None, description="Druid overlord (or coordinator as overlord), for supervisor specs"
    )
    coordinator_url: str | None = Field(None, description="Druid coordinator")
    request_timeout_s: float = Field(10.0, gt=0, description="one HTTP request to Druid at most")
    max_subquery_rows: int = Field(
        1_000_000,
        ge=1,
        description="rows the broker may hold for one merge on read (Druid's maxSubqueryRows)",
    )
    kafka_bootstrap: str | None = Field(
        None, description="Kafka as Druid's tasks reach it (default: kafka_bootstrap)"
    )
    handoff_interval_s: float = Field(
        5.0,
        ge=0,
        description="early handoffs the compaction watcher asks of one supervisor are at "
        "least this far apart (each one cuts a segment per chunk its tasks hold)",
    )
    refined_topic_suffix: str = Field(
        ".refined",
        min_length=1,
        description="the relay's topic of decoded rows, which Druid's supervisor reads, is "
        "the events topic plus this suffix",
    )


class StarRocksSettings(BaseModel):
    """Where StarRocks answers (``store.backend = "starrocks"``): SQL over the MySQL
    protocol on the FE, Stream Load over HTTP (the FE redirects it to a BE)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="a frontend (FE) host")
    query_port: int = Field(9030, ge=1, le=65535, description="the FE's MySQL-protocol port")
    http_url: str | None = Field(
        None, description="the FE's HTTP address for Stream Load (default: http://host:8030)"
    )
    user: str = "root"
    password: SecretStr | None = None
    database: str = Field("tally", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    request_timeout_s: float = Field(30.0, gt=0, description="one SQL statement or load at most")
    buckets: int = Field(8, ge=1, description="hash buckets per partition (DISTRIBUTED BY)")
    replication_num: int = Field(1, ge=1, description="replicas of each tablet (3 in production)")
    label_keep_s: float = Field(
        259_200.0,
        gt=0,
        description="how long StarRocks keeps a load's label (its label_keep_max_second): "
        "a batch left half-loaded for longer is recovered by rebuilding, not by labels",
    )

    @property
    def stream_load_url(self) -> str:
        return (self.http_url or f"http://{self.host}:8030").rstrip("/")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TALLY_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".tally")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_user: str | None = None
    kafka_password: SecretStr | None = None
    specs: tuple[Path, ...] = Field(
        default=(), description="datasource spec files; empty means the shipped payments spec"
    )
    topic_namespace: str = Field(
        "", description="prefix for every topic and consumer group, e.g. 'staging.'"
    )
    store: StoreSettings = StoreSettings()
    ingest: IngestSettings = IngestSettings()
    search: SearchSettings = SearchSettings()
    compaction: CompactionSettings = CompactionSettings()
    api: ApiSettings = ApiSettings()
    druid: DruidSettings = DruidSettings()
    starrocks: StarRocksSettings = StarRocksSettings()

    def topic(self, name: str) -> str:
        return f"{self.topic_namespace}{name}"

    def group(self, sink: str, datasource: str) -> str:
        return f"{self.topic_namespace}tally.{sink}.{datasource}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if _handed_over.get():
            return (init_settings,)
        config_file = _config_file.get()
        if config_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, config_file)

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite"

    @property
    def keys_path(self) -> Path:
        return self.data_dir / "keys.sqlite"

    @property
    def compaction_journal_path(self) -> Path:
        return self.data_dir / "compaction-runs.sqlite"

    @property
    def rate_limit_path(self) -> Path:
        return self.data_dir / "ratelimit.sqlite"

    @property
    def segments_dir(self) -> Path:
        return self.data_dir / "segments"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the process's settings from file, environment and overrides (``None``
    values are flags not given)."""
    path = config or (Path("tally.toml") if Path("tally.toml").exists() else None)
    config_file = None
    if path is not None:
        try:
            path.open("rb").close()  # the source itself skips a missing file silently
            config_file = TomlConfigSettingsSource(Settings, toml_file=path)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    token = _config_file.set(config_file)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = "environment"
        if config_file is not None and _in_file(
            config_file.toml_data, first["loc"], first["input"]
        ):
            where = str(path)
        raise ConfigError(f"{where}: {loc}: {first['msg']}") from exc
    finally:
        _config_file.reset(token)


def _in_file(data: Any, loc: tuple[int | str, ...], value: Any) -> bool:
    """Whether the file gave the bad ``value`` at ``loc`` (else the environment did)."""
    for key in loc:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return bool(data == value)


HANDOFF_ENV = "TALLY_RESOLVED_SETTINGS"


def handoff(settings: Settings) -> str:
    """``settings`` as JSON for a child process (``tally serve``'s workers), secrets
    included: a child must run with exactly its parent's settings (config file and
    command line too), not just what the environment says."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot hand over {type(value).__name__}")

    return json.dumps(settings.model_dump(), default=reveal)


def from_handoff(text: str) -> Settings:
    """The settings ``handoff`` wrote, exactly: the child's own environment and
    ./tally.toml are not read (they could only add to or break a complete object)."""
    token = _handed_over.set(True)
    try:
        return Settings(**json.loads(text))
    finally:
        _handed_over.reset(token)
