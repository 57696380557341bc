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
    config.write_text("[store]\nduckdb_threads = 3\n")  # the environment's value is the bad one
    with pytest.raises(ConfigError, match=r"^environment: store.duckdb_threads"):
        load_settings(config)


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


def test_an_env_key_of_a_section_keeps_the_files_other_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "tally.toml"
    config.write_text("[store]\nbusy_timeout_s = 9\ngc_grace_s = 5\n")
    monkeypatch.setenv("TALLY_STORE__GC_GRACE_S", "7")
    store = load_settings(config).store
    assert store.gc_grace_s == 7  # env beats the file...
    assert store.busy_timeout_s == 9  # ...for its key only


def test_a_nested_key_takes_env_then_file_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TALLY_COMPACTION__MIN_MERGE", raising=False)
    assert load_settings().compaction.min_merge == 4  # no ./tally.toml: the default
    (tmp_path / "tally.toml").write_text("[compaction]\nmin_merge = 6\n")
    assert load_settings().compaction.min_merge == 6  # ./tally.toml is read
    monkeypatch.setenv("TALLY_COMPACTION__MIN_MERGE", "8")
    settings = load_settings()
    assert settings.compaction.min_merge == 8
    assert settings.compaction == settings.compaction.model_copy(update={"min_merge": 8})


def test_an_override_beats_the_environment_and_none_is_no_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TALLY_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("TALLY_STORE__GC_GRACE_S", "7")
    assert load_settings(data_dir=None).data_dir == tmp_path / "env"
    settings = load_settings(data_dir=tmp_path / "flag", store={"busy_timeout_s": 3})
    assert settings.data_dir == tmp_path / "flag"
    assert (settings.store.busy_timeout_s, settings.store.gc_grace_s) == (3, 7)


def test_an_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "tally.toml"
    config.write_text("[store]\nbusy_timeout = 9\n")
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    assert str(err.value) == f"{config}: store.busy_timeout: Extra inputs are not permitted"
    config.write_text("kafka_bootstrapp = 'x:1'\n")
    with pytest.raises(ConfigError, match=r"tally.toml: kafka_bootstrapp: Extra inputs"):
        load_settings(config)


def test_an_unreadable_or_invalid_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read config: No such file"):
        load_settings(tmp_path / "missing.toml")
    config = tmp_path / "tally.toml"
    config.write_text("[store\n")
    with pytest.raises(ConfigError, match=r"tally.toml: invalid TOML: "):
        load_settings(config)


def test_a_handoff_ignores_the_childs_environment_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(data_dir=tmp_path, store={"gc_grace_s": 5})
    text = handoff(settings)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tally.toml").write_text("[store]\nbusy_timeout_s = 9\nbogus = 1\n")
    monkeypatch.setenv("TALLY_STORE__GC_GRACE_S", "7")
    monkeypatch.setenv("TALLY_API__BOGUS", "1")
    assert from_handoff(text) == settings
