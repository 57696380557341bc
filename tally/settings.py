"""One typed, frozen settings object per process.

Precedence (highest first): explicit overrides (CLI flags), ``TALLY_*`` environment
variables, ``tally.toml`` (or ``--config``), defaults. Nested sections use ``__`` in
environment names, e.g. ``TALLY_STORE__GC_GRACE_S=60``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tally.errors import ConfigError


class StoreSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["embedded"] = "embedded"
    gc_grace_s: float = Field(300.0, ge=0, description="keep replaced segment files this long")
    orphan_grace_s: float = Field(
        3600.0, ge=0, description="an unreferenced file older than this is a crash leftover"
    )
    busy_timeout_s: float = Field(60.0, gt=0)
    duckdb_threads: int = Field(2, ge=1)
    duckdb_memory_limit: str = "4GB"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TALLY_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".tally")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_password: SecretStr | None = None
    specs: tuple[Path, ...] = Field(
        default=(), description="datasource spec files; empty means the shipped payments spec"
    )
    store: StoreSettings = StoreSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    @property
    def catalog_path(self) -> Path:
        return self.data_dir / "catalog.sqlite"

    @property
    def segments_dir(self) -> Path:
        return self.data_dir / "segments"


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Build the process's settings from file, environment and overrides."""
    file_values: dict[str, Any] = {}
    path = config or (Path("tally.toml") if Path("tally.toml").exists() else None)
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        # File values are the lowest layer: env (read by BaseSettings) wins over them,
        # so only pass file keys the environment does not set.
        env_set = Settings().model_dump(exclude_unset=True)
        merged = {k: v for k, v in file_values.items() if k not in env_set}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = str(path) if path else "environment"
        raise ConfigError(f"{where}: {loc}: {first['msg']}") from exc
