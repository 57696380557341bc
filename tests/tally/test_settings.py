from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from tally.errors import ConfigError
from tally.settings import Settings, from_handoff, handoff, load_settings


def test_file_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tally.toml"
    config.write_text(
        'kafka_bootstrap = "file:1"\ndata_dir = "/from/file"\n[store]\ngc_grace_s = 5\n'
    )
    assert load_settings(config).kafka_bootstrap == "file:1"
    monkeypatch.setenv("TALLY_KAFKA_BOOTSTRAP", "env:2")
    monkeypatch.setenv("TALLY_STORE__GC_GRACE_S", "7")
    settings = load_settings(config, data_dir=tmp_path / "flag")
    assert settings.kafka_bootstrap == "env:2"
    assert settings.store.gc_grace_s == 7
    assert settings.data_dir == tmp_path / "flag"


def test_settings_are_frozen_and_secrets_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_KAFKA_PASSWORD", "hunter2")
    settings = load_settings(None)
    assert "hunter2" not in repr(settings)
    with pytest.raises(Exception, match="frozen"):
        settings.data_dir = Path("/elsewhere")  # type: ignore[misc]


def test_bad_config_names_where_and_what(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tally.toml"
    config.write_text("[store]\ngc_grace_s = -1\n")
    with pytest.raises(ConfigError, match=r"tally.toml: store.gc_grace_s: .*greater than or equal"):
        load_settings(config)
    monkeypatch.setenv("TALLY_STORE__DUCKDB_THREADS", "many")
    with pytest.raises(ConfigError, match=r"environment: store.duckdb_threads"):
        load_settings(None)


def test_a_handoff_carries_every_setting_and_secret(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        kafka_password=SecretStr("s3cret"),
        api={"page_max": 7, "workers": 3},
        specs=(tmp_path / "a.toml",),
    )
    text = handoff(settings)
    assert from_handoff(text) == settings
    assert from_handoff(text).kafka_password.get_secret_value() == "s3cret"  # type: ignore[union-attr]
