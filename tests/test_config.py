"""Settings precedence, provenance in errors, and the rules that keep the API key out of files and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.config import ENVIRONMENTS, Secret, load_settings
from backfill.errors import ConfigError

CREDS = {"SMILE_PARTNER_ID": "085", "SMILE_API_KEY": "k-123"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "backfill.yaml"
    path.write_text(text)
    return path


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    config = write(tmp_path, "rate: 5\nconcurrency: 3\nmax_attempts: 7\n")
    environ = {**CREDS, "BACKFILL_RATE": "6", "BACKFILL_CONCURRENCY": "4"}
    s = load_settings(config, environ, {"rate": 9.0})
    assert (s.rate, s.concurrency, s.max_attempts, s.timeout) == (9.0, 4, 7, 60.0)
    assert s.sources["rate"] == "flag --rate"
    assert s.sources["concurrency"] == "environment BACKFILL_CONCURRENCY"
    assert s.sources["max_attempts"] == f"config file {config}"
    assert s.sources["timeout"] == "default"


def test_env_picks_documented_url_and_base_url_overrides() -> None:
    assert load_settings(None, CREDS, {"env": "production"}).base_url == ENVIRONMENTS["production"]
    s = load_settings(None, CREDS, {"env": "local", "base_url": "http://127.0.0.1:9/v1/"})
    assert s.base_url == "http://127.0.0.1:9/v1"


def test_default_env_is_never_production() -> None:
    assert load_settings(None, CREDS).env == "sandbox"


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    config = write(tmp_path, "concurency: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, CREDS)
    assert info.value.key == "concurency" and "concurrency" in info.value.fix
    assert str(config) in str(info.value)


def test_bad_value_names_key_source_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {**CREDS, "BACKFILL_RATE": "fast"})
    assert info.value.key == "rate" and info.value.source == "environment BACKFILL_RATE"
    assert "'fast' is not a number" in str(info.value)


def test_api_key_in_yaml_is_refused_without_echoing_it(tmp_path: Path) -> None:
    config = write(tmp_path, "api_key: sup3r-secret\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, CREDS)
    assert "sup3r-secret" not in str(info.value) and "SMILE_API_KEY" in info.value.fix


def test_api_key_file_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "key.txt").write_text("from-file\n")
    config = write(tmp_path, "api_key_file: key.txt\npartner_id: '085'\n")
    s = load_settings(config, {})
    assert s.api_key.reveal() == "from-file" and s.partner_id == "085"
    assert "from-file" not in repr(s) and "from-file" not in str(s.redacted())


def test_unquoted_partner_id_that_lost_its_zero_is_refused(tmp_path: Path) -> None:
    config = write(tmp_path, "partner_id: 85\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config, {"SMILE_API_KEY": "k"})
    assert info.value.key == "partner_id" and "quote" in info.value.problem


def test_missing_credentials_stop_before_anything_runs() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"SMILE_PARTNER_ID": "085"})
    assert info.value.key == "api_key"
    assert load_settings(None, {}, need_credentials=False).partner_id == ""


def test_columns_mapping(tmp_path: Path) -> None:
    config = write(tmp_path, "columns:\n  user_id: customer_ref\n  image_path: selfie\n")
    s = load_settings(config, CREDS)
    assert s.columns == {
        "user_id": "customer_ref",
        "user_created_at": "user_created_at",
        "image_path": "selfie",
    }
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "columns:\n  photo: x\n"), CREDS)


def test_production_must_be_https() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, CREDS, {"env": "production", "base_url": "http://api.example/v1"})
    assert info.value.key == "base_url"


def test_secret_never_shows() -> None:
    secret = Secret("abc")
    assert "abc" not in repr(secret) and "abc" not in str(secret) and "abc" not in f"{secret}"


def test_broken_yaml_is_located_without_quoting_the_line(tmp_path: Path) -> None:
    # Found in review: the parser's message quoted the offending line, which may hold a pasted key.
    config = tmp_path / "backfill.yaml"
    config.write_text('rate: 5\napi_key: "sk_live_0123456789\nconcurrency: 4\n')
    with pytest.raises(ConfigError) as info:
        load_settings(config, {"SMILE_PARTNER_ID": "085", "SMILE_API_KEY": "k"}, {})
    assert "line" in str(info.value) and "sk_live_0123456789" not in str(info.value)
