"""Settings precedence, provenance in errors, and the rules that keep the API key out of files and flags."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from backfill.cli import main
from backfill.cli._common import SettingOption
from backfill.config import COLUMN_KEYS, ENVIRONMENTS, SPECS, Settings, Spec, Takes, load_settings
from backfill.errors import ConfigError
from backfill.redact import Secret
from backfill.sandbox import RunningSandbox

from .conftest import (
    cli,
    enrolled,
    european_export,
    free_port,
    sandbox_ledger,
    shown,
    simple_rows,
    write_manifest,
)

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
        (
            "",
            {"env": "production", "base_url": ENVIRONMENTS["sandbox"]},
            "production",
            "flag --env",
            "flag --base-url",
        ),
        ("", {"base_url": "https://API.smileidentity.com/v1/"}, "sandbox", "default", "flag --base-url"),
        ("env: local\n", {"base_url": ENVIRONMENTS["production"]}, "local", "config file", "flag --base-url"),
        (
            "env: sandbox\nbase_url: https://api.smileidentity.com:443/v1\n",
            {},
            "sandbox",
            "config file",
            "config file",
        ),
    ],
)
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
    """Through the option the CLI made for it: the first command that has it (and no option it requires, as
    purge's --before) parses it, as a user gives it."""
    command, option = next(
        (c, o)
        for c, o in setting_options()
        if flag in o.opts
        and isinstance(o, SettingOption)
        and not any(isinstance(p, click.Option) and p.required for p in c.params)
    )
    switch = spec.flag is not None and spec.flag.takes is Takes.SWITCH
    args = [flag] if switch else [flag, spec.example]
    arguments = ["MANIFEST"] * sum(isinstance(p, click.Argument) and p.required for p in command.params)
    params = command.make_context(command.name or "", [*arguments, *args]).params
    assert option.name == name
    names = {name for s in SPECS.values() for name in (s.key, *s.aliases)}
    given = {k: v for k, v in params.items() if k in names}
    return load_settings(None, {}, given, need_credentials=False)


def from_argument(tmp_path: Path, spec: Spec, name: str) -> Settings:
    """As a Python caller gives it (backfill.run's keywords): the file's key, with a Python value."""
    if spec.key == "api_key":  # never an argument itself: a file named by one holds it
        (tmp_path / "key.txt").write_text(spec.example)
        given: dict[str, object] = {"api_key_file": tmp_path / "key.txt"}
    else:
        given = {name: expected(spec) if spec.key == "columns" else spec.read(spec.example)}
    return load_settings(None, {}, need_credentials=False, arguments=given)


def sources_of(spec: Spec) -> list[tuple[str, str]]:
    """(how, where): each place the setting may come from, under each of its names."""
    found = [
        (how, name) for how in ("file", "argument") for name in (spec.key, *spec.aliases) if spec.in_file
    ]
    found += [("file", "api_key_file"), ("argument", "api_key_file")] if spec.key == "api_key" else []
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
    elif how == "argument":
        s, source = from_argument(tmp_path, spec, where), "python argument"
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
        [
            sys.executable,
            "-m",
            "backfill",
            "run",
            str(manifest),
            "--env",
            "local",
            "--base-url",
            url,
            "--checkpoint",
            str(tmp_path / "l.sqlite"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, (done.returncode, done.stderr[-300:])
    assert "s3cret" not in done.stderr and "base_url" in done.stderr


def test_a_python_callers_arguments_are_the_files_keys_on_top_of_every_layer(tmp_path: Path) -> None:
    config = write(tmp_path, "rate: 5\nconcurrency: 3\n")
    environ = {**CREDS, "BACKFILL_RATE": "6", "BACKFILL_CONCURRENCY": "4"}
    s = load_settings(config, environ, {"rate": 8.0}, arguments={"rate": 9, "checkpoint": tmp_path / "l.db"})
    assert (s.rate, s.concurrency, s.ledger) == (9.0, 4, tmp_path / "l.db")
    assert s.sources["rate"] == s.sources["ledger"] == "python argument"
    # The key itself is refused as an argument (orchestrators show a task's arguments), and never repeated.
    with pytest.raises(ConfigError) as info:
        load_settings(None, CREDS, arguments={"api_key": "k-shown-nowhere"})
    assert (info.value.key, info.value.source) == ("api_key", "python argument")
    assert "SMILE_API_KEY" in info.value.fix and "k-shown-nowhere" not in str(info.value)
    # A number where text is meant is simply wrong in Python, not YAML's reading of what was typed.
    with pytest.raises(ConfigError, match="85 is not text") as info:
        load_settings(None, CREDS, arguments={"partner_id": 85})
    assert "was read as" not in info.value.problem


# --- settings as the CLI takes them: states, credentials, variables, --help, config show, the manifest's format -


def test_a_misspelt_status_is_exit_2_naming_it_the_valid_ones_and_the_nearest(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    where = enrolled(tmp_path, threaded_sandbox, rows=3)
    code, out, err = cli("export", *where, "--status", "faild")
    assert code == 2 and out == "" and "'faild' is not a state (did you mean failed?)" in err
    assert "enrolled, failed, id_conflict" in err and "Traceback" not in err
    code, out, err = cli("retry", *where, "--status", "unknwon,pending", env={"SMILE_API_KEY": None})
    assert code == 2 and "'unknwon' is not a state (did you mean unknown?)" in err  # before the credentials
    assert cli("export", *where, "--status", "")[0] == 2  # naming nothing is not "everything"
    code, out, _ = cli("export", *where, "--status", "enrolled")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 3


def test_a_dry_run_without_credentials_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, _, err = cli(
        "run",
        str(manifest),
        "--dry-run",
        "--out",
        str(tmp_path / "out"),
        env={"SMILE_PARTNER_ID": None, "SMILE_API_KEY": None},
    )
    assert code == 2 and "SMILE_PARTNER_ID" in err and "SMILE_API_KEY" in err and "backfill validate" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_backfill_variable_warns_on_stderr(tmp_path: Path) -> None:
    code, out, err = cli(
        "config", "show", env={"BACKFILL_RAET": "20", "BACKFILL_TEST_CRASH_AT": "in_flight:3"}
    )
    assert code == 0 and "BACKFILL_RAET" not in out
    assert err.splitlines() == [
        "backfill: warning: environment BACKFILL_RAET is not a setting and was ignored (did you mean BACKFILL_RATE?)"
    ]
    # Said even when the settings then fail: the typo may be why.
    code, _, err = cli(
        "run", str(tmp_path / "m.csv"), env={"SMILE_PARTNER_ID": None, "BACKFILL_PARTNERID": "085"}
    )
    assert code == 2 and "did you mean BACKFILL_PARTNER_ID?" in err and "no partner ID" in err


def test_run_help_shows_the_real_defaults_without_setting_them() -> None:
    defaults = {f.name: f.default for f in fields(Settings)}
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).stdout.split())
    command = main.commands["run"]
    context = click.Context(command)
    for key in [
        "concurrency",
        "rate",
        "max_attempts",
        "timeout",
        "fail_threshold",
        "out",
        "env",
        "log_level",
        "log_format",
    ]:
        option = next(p for p in command.params if p.name == key and isinstance(p, click.Option))
        record = option.get_help_record(context)
        assert record is not None and f"[default: ({defaults[key]})]" in record[1], key
        assert " ".join(record[1].split()) in help_text
    # Shown, not set: a flag left out must reach the settings as None, or it would override YAML and BACKFILL_*.
    given = command.make_context("run", ["users.csv"]).params
    assert {k: v for k, v in given.items() if k in defaults and v is not None} == {}


def test_production_with_the_sandbox_url_stops_before_anything_is_sent(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    config = tmp_path / "backfill.yaml"
    config.write_text("base_url: https://testapi.smileidentity.com/v1\n")
    code, _, err = cli(
        "run", str(manifest), "--config", str(config), "--env", "production", "--out", str(tmp_path / "out")
    )
    assert code == 2 and "base_url (from config file" in err and "env is production (from flag --env)" in err
    assert not (tmp_path / "out").exists()


def test_config_show_names_the_ledger_the_run_used_and_says_it_is_derived(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    env: dict[str, str | None] = {
        "XDG_DATA_HOME": str(tmp_path / "data"),
        "BACKFILL_BASE_URL": threaded_sandbox.base_url,
    }
    manifest = write_manifest(tmp_path, simple_rows(2))
    code, _, err = cli(
        "run", str(manifest), "--env", "local", "--out", str(tmp_path / "out"), "--no-progress", env=env
    )
    assert code == 0, err
    code, out, _ = cli("status", "--env", "local", env=env)
    used = out.splitlines()[0].split()[1]  # "ledger PATH (partner ..., endpoint)"
    assert code == 0 and Path(used).is_file()

    code, out, _ = cli("config", "show", "--env", "local", env=env)
    row = shown(out)["ledger"]
    assert code == 0 and "null" not in row
    assert row.split()[1] == used and "partner_id and base_url" in row
    code, out, _ = cli("config", "show", "--env", "local", "--json", env=env)
    assert json.loads(out)["ledger"]["value"] == used

    # One that is named is shown as named, with where it was named, under its old name too.
    for variable in ("BACKFILL_LEDGER", "BACKFILL_CHECKPOINT"):
        code, out, _ = cli("config", "show", env={variable: str(tmp_path / "cp.sqlite")})
        row = shown(out)["ledger"]
        assert str(tmp_path / "cp.sqlite") in row and f"environment {variable}" in row


def test_config_show_without_a_partner_id_says_the_ledger_cannot_be_derived() -> None:
    code, out, _ = cli("config", "show", env={"SMILE_PARTNER_ID": None})
    row = shown(out)["ledger"]
    assert code == 0 and "null" not in row and "nopartner" not in row
    assert "no partner ID" in row and "SMILE_PARTNER_ID" in row
    code, out, _ = cli("config", "show", "--json", env={"SMILE_PARTNER_ID": None})
    assert "no partner ID" in json.loads(out)["ledger"]["source"]


def test_the_manifest_settings_take_yaml_then_environment_then_flags_and_say_where_each_came_from(
    tmp_path: Path,
) -> None:
    manifest = european_export(tmp_path)
    config = tmp_path / "backfill.yaml"
    config.write_text('delimiter: "|"\nencoding: latin-1\ncolumns: {user_id: customer_ref, image_path: x}\n')
    env: dict[str, str | None] = {"BACKFILL_ENCODING": "cp1252", "BACKFILL_COLUMNS": "image_path=selfie"}
    code, out, err = cli("config", "show", "--config", str(config), env=env)
    rows = shown(out)
    assert code == 0 and err == ""  # BACKFILL_COLUMNS is a setting: no "not a setting" warning
    assert rows["delimiter"].split()[1] == "|" and f"config file {config}" in rows["delimiter"]
    assert rows["encoding"].split()[1] == "cp1252" and "environment BACKFILL_ENCODING" in rows["encoding"]
    assert '"user_id": "customer_ref"' in rows["columns"] and '"image_path": "selfie"' in rows["columns"]
    mixed = f"user_id from config file {config}; image_path from environment BACKFILL_COLUMNS"
    assert mixed in rows["columns"]
    code, out, _ = cli("config", "show", "--config", str(config), "--json", env=env)
    assert json.loads(out)["delimiter"] == {"value": "|", "source": f"config file {config}"}

    # The file is semicolon-separated and calls its date column `signup`: only the flags make it readable.
    v = ["--out", str(tmp_path / "v")]
    code, _, err = cli("validate", str(manifest), "--config", str(config), *v, env=env)
    assert code == 2 and "--delimiter ';'" in err  # the mistake is named, with the flag that fixes it
    flags = ["--delimiter", ";", "--column", "user_created_at=signup"]
    code, out, err = cli("validate", str(manifest), "--config", str(config), *flags, *v, env=env)
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err
    # A flag beats the environment, role by role.
    env["BACKFILL_COLUMNS"] = "image_path=x,user_created_at=signup"
    code, out, err = cli(
        "validate",
        str(manifest),
        "--config",
        str(config),
        *flags,
        "--column",
        "image_path=selfie",
        *v,
        env=env,
    )
    assert code == 0 and out.startswith("3 valid, 0 rejected"), err


@pytest.mark.parametrize(
    ("flag", "problem", "fix"),
    [
        (
            ["--column", "customer_ref"],
            "columns (from flag --column): 'customer_ref' is not ROLE=NAME",
            "Fix: write it as --column user_id=customer_ref",
        ),
        (
            ["--column", "userid=customer_ref"],
            "columns (from flag --column): 'userid' is not a column role (did you mean user_id?)",
            "use only user_id, user_created_at, image_path, e.g. --column user_id=customer_ref",
        ),
        (
            ["--column", "user_id="],
            "columns.user_id (from flag --column): '' is not a column name",
            "e.g. --column user_id=customer_ref",
        ),
        (
            ["--column", "user_id=a", "--column", "image_path=a"],
            "columns (from flag --column): user_id and image_path both map to the column 'a'",
            "its own column",
        ),
        (
            ["--delimiter", ";;"],
            "delimiter (from flag --delimiter): ';;' is not one ASCII character",
            "or tab",
        ),
        (["--delimiter", "§"], "delimiter (from flag --delimiter): '§' is not one ASCII character", "or tab"),
        (
            ["--encoding", "klingon"],
            "encoding (from flag --encoding): 'klingon' is not a text encoding",
            "cp1252",
        ),
    ],
)
def test_a_bad_manifest_flag_is_a_config_error_naming_the_flag_and_the_fix(
    tmp_path: Path, flag: list[str], problem: str, fix: str
) -> None:
    manifest = european_export(tmp_path)
    for command in ("validate", "run"):
        code, out, err = cli(command, str(manifest), *flag, "--out", str(tmp_path / "out"))
        assert code == 2 and out == "" and problem in err and fix in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    code, out, _ = cli("check", str(manifest), *flag)
    assert code == 2 and f"problem  settings: {problem}" in out


def test_metrics_addr_with_no_host_is_accepted_by_run_and_config_show(
    tmp_path: Path, threaded_sandbox: RunningSandbox
) -> None:
    manifest = write_manifest(tmp_path, simple_rows(2))
    port = free_port()
    code, _, err = cli(
        "run",
        str(manifest),
        *sandbox_ledger(tmp_path, threaded_sandbox),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--metrics-addr",
        f":{port}",
    )
    assert code == 0 and "config error" not in err, err
    code, out, _ = cli("config", "show", env={"BACKFILL_METRICS_ADDR": f":{port}"})
    row = shown(out)["metrics_addr"]
    assert code == 0 and f":{port}" in row and "environment BACKFILL_METRICS_ADDR" in row
    # The other forms still are what they were.
    for addr in (f"127.0.0.1:{port}", f"[::1]:{port}", f"0.0.0.0:{port}"):
        code, out, _ = cli("config", "show", env={"BACKFILL_METRICS_ADDR": addr})
        assert code == 0 and addr in shown(out)["metrics_addr"]


@pytest.mark.parametrize("bad", [":", ":0", ":http", ":70000", "9464"])
def test_a_bad_metrics_addr_still_names_the_key_its_source_and_the_fix(tmp_path: Path, bad: str) -> None:
    manifest = write_manifest(tmp_path, simple_rows(1))
    code, _, err = cli("run", str(manifest), "--metrics-addr", bad, "--out", str(tmp_path / "out"))
    assert code == 2 and "metrics_addr (from flag --metrics-addr)" in err and "Fix:" in err, err
    assert ":PORT for every interface (:9464)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
