"""Settings precedence, provenance in errors, and the rules that keep the API key out of files and flags."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import click
import pytest

from backfill.cli import main
from backfill.cli._common import SettingOption
from backfill.config import COLUMN_KEYS, ENVIRONMENTS, SPECS, Settings, Spec, Takes, load_settings
from backfill.errors import ConfigError
from backfill.redact import Secret

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
    assert info.value.key == "partner_id" and 'quote it: partner_id: "85"' in str(info.value)


@pytest.mark.parametrize(
    ("written", "read_as"),
    [
        ("012", "the number 10 (a leading 0 makes it octal)"),
        ("0x1F", "the number 31 (0x makes it hexadecimal)"),
        ("1_000", "the number 1000 (YAML drops the _ in a number)"),
        ("1:20", "the number 80 (YAML 1.1 reads a:b as base 60)"),
        ("1.5e+3", "the number 1500.0"),
        ("true", "a true/false value"),
        ("2021-05-18", "a date"),
    ],
)
def test_a_yaml_value_read_as_a_number_is_quoted_as_written(
    tmp_path: Path, written: str, read_as: str
) -> None:
    # Found by a new user: `partner_id: 012` suggested quoting it as "010", YAML's octal 10 with a zero put back.
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f"partner_id: {written}  # ours\n"), {"SMILE_API_KEY": "k"})
    assert info.value.key == "partner_id"
    assert info.value.problem == f"{written} was read as {read_as}, not text"
    assert info.value.fix == f'quote it: partner_id: "{written}"'


@pytest.mark.parametrize("written", ["085", "1e3", "1.5e3", '"012"', "'012'"])
def test_yaml_values_that_stay_text_are_taken_as_written(tmp_path: Path, written: str) -> None:
    # YAML 1.1 (PyYAML) reads 085 (8 is no octal digit), 1e3 (no dot) and 1.5e3 (no sign) as strings.
    s = load_settings(write(tmp_path, f"partner_id: {written}\n"), {"SMILE_API_KEY": "k"})
    assert s.partner_id == written.strip("'\"")


def test_other_text_settings_and_columns_are_quoted_as_written_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "out: 0777\n"), CREDS)
    assert info.value.key == "out" and info.value.fix == 'quote it: out: "0777"'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "columns:\n  user_id: 007\n"), CREDS)
    assert info.value.key == "columns.user_id" and info.value.fix == 'quote it: user_id: "007"'
    # Numbers where numbers belong are still numbers.
    assert load_settings(write(tmp_path, "rate: 1_000\nconcurrency: 0x10\n"), CREDS).concurrency == 16


def test_missing_credentials_stop_before_anything_runs() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"SMILE_PARTNER_ID": "085"})
    assert info.value.key == "api_key"
    assert load_settings(None, {}, need_credentials=False).partner_id == ""


@pytest.mark.parametrize(("environ", "key"), [({}, "partner_id"), ({"SMILE_PARTNER_ID": "085"}, "api_key")])
def test_a_dry_run_needs_credentials_too(environ: dict[str, str], key: str) -> None:
    # A dry run signs every request: without credentials it passed while checking nothing it claimed to.
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ, {"dry_run": True})
    assert info.value.key == key
    assert "SMILE_PARTNER_ID" in info.value.fix and "SMILE_API_KEY" in info.value.fix
    assert "backfill validate" in info.value.fix
    assert load_settings(None, CREDS, {"dry_run": True}).dry_run


@pytest.mark.parametrize(
    ("yaml_text", "flags", "env", "env_from", "url_from"),
    [
        ("", {"env": "production", "base_url": ENVIRONMENTS["sandbox"]}, "production", "flag --env", "flag --base-url"),
        ("", {"base_url": "https://API.smileidentity.com/v1/"}, "sandbox", "default", "flag --base-url"),
        ("env: local\n", {"base_url": ENVIRONMENTS["production"]}, "local", "config file", "flag --base-url"),
        ("env: sandbox\nbase_url: https://api.smileidentity.com:443/v1\n", {}, "sandbox", "config file",
         "config file"),
    ],
)  # fmt: skip
def test_an_env_and_a_base_url_that_disagree_are_refused(
    tmp_path: Path, yaml_text: str, flags: dict[str, str], env: str, env_from: str, url_from: str
) -> None:
    config = write(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError) as info:
        load_settings(config, CREDS, flags)
    assert info.value.key == "base_url" and info.value.source.startswith(url_from)
    assert f"but env is {env} (from {env_from}" in info.value.problem and "make them agree" in info.value.fix


def test_a_base_url_of_ones_own_is_any_envs_to_label() -> None:
    for env in ENVIRONMENTS:
        assert load_settings(None, CREDS, {"env": env, "base_url": "https://proxy.example/v1"}).env == env
        assert load_settings(None, CREDS, {"env": env, "base_url": ENVIRONMENTS[env]}).env == env
    assert load_settings(None, CREDS, {"env": "sandbox", "base_url": ENVIRONMENTS["local"]}).env == "sandbox"


def test_an_unknown_backfill_variable_is_a_warning_with_the_nearest_name() -> None:
    s = load_settings(None, {**CREDS, "BACKFILL_RAET": "20", "BACKFILL_TEST_CRASH_AT": "in_flight:3"})
    assert s.rate == 10.0  # ignored, as it always was, but now said
    assert s.warnings == (
        "environment BACKFILL_RAET is not a setting and was ignored (did you mean BACKFILL_RATE?)",
    )
    assert "warnings" not in s.redacted()
    said = "\n".join(load_settings(None, {**CREDS, "backfill_rate": "1", "BACKFILL_API_KEY": "k-9"}).warnings)
    assert "case-sensitive" in said and "SMILE_API_KEY only" in said and "k-9" not in said
    assert load_settings(None, {**CREDS, "BACKFILL_RATE": "20", "OTHER_RAET": "1"}).warnings == ()


def test_known_non_setting_variables_match_the_code_that_reads_them() -> None:
    from backfill.config import KNOWN_NON_SETTINGS
    from backfill.run.crash import CRASH_ENV

    assert CRASH_ENV in KNOWN_NON_SETTINGS


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


# --- each setting declared once: its Spec is what every source reads -----------------------------------------

RECORD_FIELDS = {"sources", "warnings", "credential_problems"}  # what load_settings says, not settings


def setting_options() -> list[tuple[click.Command, click.Option]]:
    """Every option of every command, with its command."""
    found: list[tuple[click.Command, click.Option]] = []
    commands: list[click.Command] = [main]
    while commands:
        command = commands.pop()
        if isinstance(command, click.Group):
            commands.extend(command.commands.values())
        found += [(command, p) for p in command.params if isinstance(p, click.Option)]
    return found


def expected(spec: Spec) -> object:
    """The value a setting takes from its example."""
    if spec.key == "columns":
        return {**{k: k for k in COLUMN_KEYS}, "user_id": "customer_ref"}
    return spec.example if spec.key == "api_key" else spec.read(spec.example)


def default_of(key: str) -> object:
    made = next(f for f in fields(Settings) if f.name == key)
    if made.default is not MISSING:
        return made.default
    assert callable(made.default_factory)
    return made.default_factory()


def value_of(settings: Settings, key: str) -> object:
    value = getattr(settings, key)
    return value.reveal() if isinstance(value, Secret) else value


def from_file(tmp_path: Path, spec: Spec, name: str) -> Settings:
    if spec.key == "columns":
        text = "columns: {user_id: customer_ref}\n"
    elif spec.key == "api_key":  # never in the file itself: a file the file names holds it
        (tmp_path / "key.txt").write_text(spec.example)
        text = "api_key_file: key.txt\n"
    else:  # text quoted, as YAML would read [0-9]+ as a list; numbers and true/false as YAML reads them
        text = f"{name}: {json.dumps(spec.example) if spec.text else spec.example}\n"
    return load_settings(write(tmp_path, text), {}, need_credentials=False)


def from_flag(spec: Spec, flag: str, name: str) -> Settings:
    """Through the option the CLI made for it: the first command that has it parses it, as a user gives it."""
    command, option = next(
        (c, o) for c, o in setting_options() if flag in o.opts and isinstance(o, SettingOption)
    )
    switch = spec.flag is not None and spec.flag.takes is Takes.SWITCH
    args = [flag] if switch else [flag, spec.example]
    arguments = ["MANIFEST"] * sum(isinstance(p, click.Argument) and p.required for p in command.params)
    params = command.make_context(command.name or "", [*arguments, *args]).params
    assert option.name == name
    names = {name for s in SPECS.values() for name in (s.key, *s.aliases)}
    given = {k: v for k, v in params.items() if k in names}
    return load_settings(None, {}, given, need_credentials=False)


def sources_of(spec: Spec) -> list[tuple[str, str]]:
    """(how, where): each place the setting may come from, under each of its names."""
    found = [("file", name) for name in (spec.key, *spec.aliases) if spec.in_file]
    found += [("file", "api_key_file")] if spec.key == "api_key" else []
    found += [("environment", var) for var in spec.variables]
    if spec.flag is not None:
        found += [("flag", flag) for flag in (spec.flag_name, *spec.old_flags)]
    return found


@pytest.mark.parametrize(
    ("key", "how", "where"), [(s.key, *w) for s in SPECS.values() for w in sources_of(s)]
)
def test_every_setting_is_read_from_each_of_its_sources(
    tmp_path: Path, key: str, how: str, where: str
) -> None:
    spec = SPECS[key]
    assert expected(spec) != default_of(key)  # else the test could pass without reading it
    if how == "file":
        s, source = from_file(tmp_path, spec, where), f"config file {tmp_path / 'backfill.yaml'}"
    elif how == "environment":
        raw = "user_id=customer_ref" if key == "columns" else spec.example
        s, source = load_settings(None, {where: raw}, need_credentials=False), f"environment {where}"
    else:
        name = spec.key if where == spec.flag_name else spec.aliases[spec.old_flags.index(where)]
        s, source = from_flag(spec, where, name), f"flag {where}"
    switch = how == "flag" and spec.flag is not None and spec.flag.takes is Takes.SWITCH
    assert value_of(s, key) == (spec.flag.value if switch and spec.flag else expected(spec))
    assert s.sources[key].startswith(source)


def test_every_field_is_a_setting_with_a_spec_and_every_flag_is_an_option_made_from_it() -> None:
    names = {f.name for f in fields(Settings)} - RECORD_FIELDS
    assert set(SPECS) == names  # a field without a Spec would be read from nowhere
    options = setting_options()
    for spec in SPECS.values():
        made = [o for _, o in options if o.name == spec.key]
        if spec.flag is None:
            assert spec.no_flag and not made, spec.key  # deliberately without one, and none made by hand
            continue
        assert made, f"--{spec.key}: no command takes its flag"
        assert all(isinstance(o, SettingOption) and o.opts == [spec.flag_name] for o in made), spec.key
        for alias, flag in zip(spec.aliases, spec.old_flags, strict=True):
            old = [o for _, o in options if o.name == alias]
            assert len(old) == len(made) and all(o.hidden and o.opts == [flag] for o in old)
    # No option sets a setting but one made from its Spec (a hand-made --rate would drift from it).
    assert all(isinstance(o, SettingOption) for _, o in options if o.name in SPECS)
    assert {f.name for f in fields(Settings) if f.type == "Secret"} == {
        k for k, s in SPECS.items() if s.secret
    }
    with pytest.raises(TypeError, match="says why not"):
        Spec(help="A new setting.", example="1", parse=int, flag=None)


def test_env_choices_come_from_the_environments() -> None:
    chosen = {tuple(o.type.choices) for _, o in setting_options() if o.name == "env"}
    assert chosen == {tuple(ENVIRONMENTS)}


# --- ledger, once checkpoint: the old name still works everywhere, and says itself in errors ------------------


def test_the_ledger_is_read_under_its_old_name_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    for s in (
        load_settings(write(tmp_path, f"checkpoint: {path}\n"), {}, need_credentials=False),
        load_settings(None, {"BACKFILL_CHECKPOINT": str(path)}, need_credentials=False),
        load_settings(None, {}, {"checkpoint": str(path)}, need_credentials=False),
    ):
        assert s.ledger == path and s.ledger_path() == path
    # The same value under both names is one value; the new name is the one said.
    s = load_settings(
        None, {"BACKFILL_CHECKPOINT": str(path), "BACKFILL_LEDGER": str(path)}, need_credentials=False
    )
    assert s.sources["ledger"] == "environment BACKFILL_LEDGER"


WITH_PASSWORD = "postgresql://app:pw-1@db/m"


@pytest.mark.parametrize(
    ("yaml_text", "environ", "flags", "said", "source"),
    [
        (f"checkpoint: {WITH_PASSWORD}\n", {}, {}, "checkpoint", "config file"),
        ("", {"BACKFILL_CHECKPOINT": WITH_PASSWORD}, {}, "checkpoint", "environment BACKFILL_CHECKPOINT"),
        ("", {}, {"checkpoint": WITH_PASSWORD}, "checkpoint", "flag --checkpoint"),
        ("", {}, {"ledger": WITH_PASSWORD}, "ledger", "flag --ledger"),
    ],
)
def test_an_error_names_the_ledger_as_it_was_written(
    tmp_path: Path, yaml_text: str, environ: dict[str, str], flags: dict[str, str], said: str, source: str
) -> None:
    config = write(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ, flags, need_credentials=False)
    assert info.value.key == said and info.value.source.startswith(source)
    assert "password" in info.value.problem and "pw-1" not in str(info.value)


BOTH = {"BACKFILL_CHECKPOINT": "a.sqlite", "BACKFILL_LEDGER": "b.sqlite"}


@pytest.mark.parametrize(
    ("yaml_text", "environ", "flags", "names", "fix"),
    [
        ("checkpoint: a.sqlite\nledger: b.sqlite\n", {}, {}, "checkpoint and ledger", "give ledger alone"),
        ("", BOTH, {}, "BACKFILL_CHECKPOINT and BACKFILL_LEDGER", "give BACKFILL_LEDGER alone"),
        ("", {}, {"checkpoint": "a", "ledger": "b"}, "--checkpoint and --ledger", "give --ledger alone"),
    ],
)
def test_both_names_of_the_ledger_with_different_values_are_refused(
    tmp_path: Path, yaml_text: str, environ: dict[str, str], flags: dict[str, str], names: str, fix: str
) -> None:
    config = write(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ, flags, need_credentials=False)
    assert info.value.key == "ledger" and info.value.problem.startswith(f"{names} are one setting")
    assert info.value.fix == fix


def test_the_cli_takes_the_ledger_as_either_flag(tmp_path: Path) -> None:
    from click.testing import CliRunner

    for flag in ("--ledger", "--checkpoint"):
        missing = tmp_path / f"{flag.strip('-')}.sqlite"
        result = CliRunner().invoke(main, ["status", flag, str(missing)], env={})
        assert result.exit_code == 2 and f"no ledger at {missing}" in result.stderr, result.output
    result = CliRunner().invoke(main, ["status", "--ledger", "a.sqlite", "--checkpoint", "b.sqlite"], env={})
    assert result.exit_code == 2 and "--checkpoint and --ledger are one setting" in result.stderr


def test_the_example_file_names_every_setting_and_each_of_its_lines_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "backfill.example.yaml"
    lines = example.read_text().splitlines()
    keys = {m.group(1) for line in lines if (m := re.match(r"^(?:# )?([a-z_]+):", line))}
    assert {k for k, s in SPECS.items() if s.in_file} <= keys and keys <= {*SPECS, "api_key_file"}
    assert load_settings(example, {}, need_credentials=False).partner_id == "085"
    for line in lines:  # each commented-out setting, given alone, is one the tool takes
        if re.match(r"^# [a-z_]+:", line) and not line.startswith("# api_key_file:"):
            load_settings(write(tmp_path, line.removeprefix("# ")), {}, need_credentials=False)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999/v1", "http://[::1/v1", "https:///v1", "https://ops:s3cret@proxy/v1"]
)
def test_a_bad_base_url_is_a_config_error_not_a_traceback(tmp_path: Path, url: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("user_id,user_created_at,image_path\n")
    env = {**os.environ, "SMILE_PARTNER_ID": "000", "SMILE_API_KEY": "local-sandbox-key"}
    done = subprocess.run(
        [sys.executable, "-m", "backfill", "run", str(manifest), "--env", "local", "--base-url", url,
         "--checkpoint", str(tmp_path / "l.sqlite"), "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-300:])
    assert "s3cret" not in done.stderr and "base_url" in done.stderr
