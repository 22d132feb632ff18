"""Settings: defaults < YAML file < environment < flags, validated and frozen before the run starts."""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from .errors import ConfigError
from .redact import Secret

ENVIRONMENTS: dict[str, str] = {
    "local": "http://127.0.0.1:8080/v1",
    "sandbox": "https://testapi.smileidentity.com/v1",
    "production": "https://api.smileidentity.com/v1",
}
COLUMN_KEYS = ("user_id", "user_created_at", "image_path")
DERIVED_LEDGER = (
    "partner_id and base_url"  # read after "from", as every source is: "(from partner_id and base_url)"
)


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, resolved. `sources` says where each value came from (for messages)."""

    env: str = "sandbox"
    base_url: str = ENVIRONMENTS["sandbox"]
    partner_id: str = ""
    api_key: Secret = field(default_factory=lambda: Secret(""))
    concurrency: int = 8
    rate: float = 10.0
    max_attempts: int = 5
    timeout: float = 60.0
    connect_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    fail_threshold: float = 0.5
    checkpoint: Path | str | None = None  # a SQLite file, or a postgresql:// URL (str) for a fleet's ledger
    lease: float = 30.0  # seconds a PostgreSQL claim lasts unless its owner renews it (a third as often)
    ledger_outage: float = 60.0  # seconds a lost PostgreSQL ledger is waited for before a run stops (exit 2)
    data_dir: Path = Path("~/.local/share/backfill")  # where default ledgers live; resolved at load
    out: Path = Path("backfill-out")
    dry_run: bool = False
    limit: int | None = None
    progress: bool = True
    columns: Mapping[str, str] = field(default_factory=lambda: {k: k for k in COLUMN_KEYS})
    delimiter: str = ","  # the manifest's one character between values
    encoding: str = "utf-8"  # the manifest's text encoding; UTF-8 is read with or without a byte order mark
    user_id_pattern: str = r"[A-Za-z0-9_-]+"
    max_image_bytes: int = 5 * 1024 * 1024
    images_root: Path | None = None
    chunk_rows: int = 10_000
    read_concurrency: int = 32  # photos in object storage checked or listed at once (not --concurrency)
    max_duration: float | None = None  # seconds; stop starting new rows after this long
    log_format: str = "text"
    log_file: Path | None = None
    log_level: str = "info"
    status_every: float = 30.0  # seconds between one-line status logs when there is no progress bar
    metrics_addr: str | None = None  # HOST:PORT, or :PORT on every interface, for metrics; None: off
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    # What was ignored but looks meant (an unknown BACKFILL_* variable): the CLI prints these; nothing else does.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # Credentials that were given but can't be used, held back for `check` (load_settings(defer_credentials=True))
    # so that it names every one in a run, not one per re-run; the credential itself is left unset.
    credential_problems: tuple[ConfigError, ...] = field(default=(), compare=False)

    @property
    def endpoint(self) -> str:
        """scheme://host:port of the API actually used: what a ledger is bound to, whatever the env label."""
        return endpoint_of(self.base_url)

    @property
    def production(self) -> bool:
        """Whether requests go to Smile ID's production API. Decided by the endpoint actually used, whatever the
        env label; a URL of its own labelled production (a proxy or tunnel in front of it) counts too."""
        return self.endpoint == endpoint_of(ENVIRONMENTS["production"]) or self.env == "production"

    @property
    def ledger_url(self) -> str | None:
        """The PostgreSQL ledger's URL (never with a password) when --checkpoint names one, else None."""
        return self.checkpoint if isinstance(self.checkpoint, str) else None

    def checkpoint_path(self) -> Path:
        """The ledger: the one named, else one per partner and endpoint in the user's data folder.

        Not in the current folder: the same command run from anywhere must find the same ledger, or a re-run
        from elsewhere would start afresh and send every enrolled user again.
        """
        if isinstance(self.checkpoint, str):
            raise ValueError("the ledger is a PostgreSQL database, not a file: see ledger_url")
        if self.checkpoint is not None:
            return Path(os.path.abspath(self.checkpoint))
        parts = urlsplit(self.base_url)
        host = f"{parts.hostname or 'nohost'}_{_port(parts)}"
        name = _SAFE.sub("_", f"{self.partner_id or 'nopartner'}@{host}")
        return self.data_dir / "ledgers" / f"{name}.sqlite"

    def ledger_location(self) -> str | None:
        """The ledger a run with these settings uses, as text: the URL, the file named, or the default one; None
        when the default one has nothing to be derived from (no partner ID), where a path would be a guess."""
        if self.ledger_url is not None:
            return self.ledger_url
        if self.checkpoint is None and not self.partner_id:
            return None
        return str(self.checkpoint_path())

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values with secrets masked, for summaries and `config show`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("sources", "warnings", "credential_problems"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = "***" if value else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


_SAFE = re.compile(r"[^A-Za-z0-9@._-]")


def _port(parts: Any) -> int:
    return int(parts.port or (443 if parts.scheme == "https" else 80))


def endpoint_of(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{_port(parts)}"


# --- parsing of single values: each returns the value or raises ValueError with a human reason ---


def _positive_int(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{value} is not at least 1")
    return value


def _positive_float(raw: object) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number")
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ValueError(f"{raw!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{raw!r} is not a positive number")
    return value


def _fraction(raw: object) -> float:
    value = _positive_float(raw)
    if value > 1:
        raise ValueError(f"{raw!r} is not a fraction between 0 and 1")
    return value


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{raw!r} is not true or false")


def _text(raw: object) -> str:
    # A YAML value read as a number never gets here (see _not_text, which quotes it as written).
    if raw is None:
        raise ValueError("it is empty")
    if not isinstance(raw, str):
        raise ValueError(f"{raw!r} is not text")
    if not raw.strip():
        raise ValueError("it is empty")
    return raw.strip()


def _path(raw: object) -> Path:
    return Path(raw if isinstance(raw, os.PathLike) else _text(raw)).expanduser()


PG_SCHEMES = ("postgresql://", "postgres://")


_DSN_KEYWORD = re.compile(
    r"(?:^|\s)(?:host|hostaddr|dbname|user|port|password|passfile|service|sslmode)\s*=", re.I
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")
_PG_FORM = "postgresql://user@host:port/dbname (the password from PGPASSWORD, ~/.pgpass or a service file)"


def _checkpoint(raw: object) -> Path | str:
    """A SQLite file's path, or a PostgreSQL URL whose password lives where libpq finds it, never in argv.

    Nothing that looks like a connection string becomes a file: a libpq `host=... dbname=...` string or a
    mistyped scheme would otherwise make a new, empty SQLite ledger under that name (with any password in its
    name), and a run on it would send every enrolled user again. None of these errors repeats the value.
    """
    if isinstance(raw, os.PathLike):
        return _path(raw)
    text = _text(raw)
    if not text.lower().startswith(PG_SCHEMES):
        if _DSN_KEYWORD.search(text):
            raise ValueError(f"this looks like a libpq connection string; give it as a URL: {_PG_FORM}")
        scheme = _SCHEME.match(text)
        if scheme:
            raise ValueError(
                f"the scheme {scheme.group(1)!r}: is not a ledger's; a ledger is a file path, or {_PG_FORM}"
            )
        return _path(text)
    parts = urlsplit(text)
    keys = {k.strip().lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if parts.password is not None or any("password" in k for k in keys):  # password, sslpassword
        # Anything on the command line is visible to every user of the machine (ps, /proc) and ends up in logs.
        raise ValueError(
            "the URL holds a password: put it in PGPASSWORD, ~/.pgpass or a service file (PGSERVICE) instead, "
            "where libpq and psql read it, and give the URL without it (postgresql://user@host:port/dbname)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that isn't a number
    except ValueError as exc:
        raise ValueError(f"the PostgreSQL URL's port is not usable ({exc}): {_PG_FORM}") from None
    if not parts.path.strip("/") and "service" not in keys:
        raise ValueError(
            "the URL names no database: add /dbname (it must exist; the tool makes its own schema)"
        )
    return text


def _env_name(raw: object) -> str:
    value = _text(raw).lower()
    if value not in ENVIRONMENTS:
        raise ValueError(f"{raw!r} is not one of {', '.join(ENVIRONMENTS)}")
    return value


def _url(raw: object) -> str:
    value = _text(raw).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{raw!r} is not an http(s) URL")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that isn't a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"{raw!r} is not a usable URL ({exc})") from None
    if not parts.hostname:
        raise ValueError(f"{raw!r} names no host")
    if parts.username or parts.password:
        # The URL goes into summaries, logs and the ledger's binding: credentials have no place in it.
        raise ValueError("the URL holds a user name or password; give the API root without them")
    return value


def _duration(raw: object) -> float:
    """Seconds, from a number or a number with s, m or h (`90m`, `2h`)."""
    text = str(raw).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 0)
    try:
        value = _positive_float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise ValueError(f"{raw!r} is not a duration like 3600, 90m or 2h") from None
    return value


def _host_port(raw: object) -> str:
    """HOST:PORT to listen on (`127.0.0.1:9464`, `[::1]:9464`, `0.0.0.0:9464`), or `:9464` for every interface
    (how Prometheus exporters write it); the port from 1 to 65535."""
    value = _text(raw)
    host, colon, port = value.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or (host and not bare) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT or :PORT with a port from 1 to 65535")
    if ":" in bare and bare == host:
        raise ValueError(f"{value!r}: put an IPv6 address in brackets, e.g. [::1]:9464")
    if any(c.isspace() or c in "/[]" for c in bare):
        raise ValueError(f"{value!r} names no usable host")
    return value


def listen_address(addr: str) -> tuple[str, int]:
    """The host and port a `metrics_addr` (checked by `_host_port`) binds: no host is every IPv4 interface."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# Names for delimiters that are awkward to type or to see on a command line; the character itself works too.
_DELIMITER_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|", "space": " "}


def _delimiter(raw: object) -> str:
    """The manifest's one character between values (`;`, `|`), or a name for one (`tab`, `\\t`)."""
    if not isinstance(raw, str) or not raw:
        raise ValueError("it is empty" if raw in ("", None) else f"{raw!r} is not a character")
    # Not stripped: a tab or a space is a delimiter like any other.
    value = _DELIMITER_NAMES.get(raw.strip().lower(), raw) if raw.strip() else raw
    if len(value) != 1 or value in '"\r\n' or not value.isascii():
        # The CSV parser takes a one-byte separator only: '§' (or any non-ASCII one) fails at the first read.
        raise ValueError(f"{raw!r} is not one ASCII character other than a quote or a line break")
    return value


def _encoding(raw: object) -> str:
    """A text encoding Python knows (`cp1252`, `latin-1`, `utf-16`), kept as written."""
    value = _text(raw)
    try:
        "".encode(value)  # LookupError for an unknown name, and for a codec that isn't text (base64)
    except LookupError:
        raise ValueError(f"{value!r} is not a text encoding Python knows") from None
    return value


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = _text(raw).lower()
        if value not in allowed:
            raise ValueError(f"{raw!r} is not one of {', '.join(allowed)}")
        return value

    return parse


def _pattern(raw: object) -> str:
    import re

    value = _text(raw)
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
    return value


_PARSERS: dict[str, Callable[[object], Any]] = {
    "env": _env_name,
    "base_url": _url,
    "partner_id": _text,
    "concurrency": _positive_int,
    "rate": _positive_float,
    "max_attempts": _positive_int,
    "timeout": _positive_float,
    "connect_timeout": _positive_float,
    "backoff_initial": _positive_float,
    "backoff_max": _positive_float,
    "fail_threshold": _fraction,
    "checkpoint": _checkpoint,
    "lease": _positive_float,
    "ledger_outage": _positive_float,
    "data_dir": _path,
    "out": _path,
    "dry_run": _boolean,
    "limit": _positive_int,
    "progress": _boolean,
    "user_id_pattern": _pattern,
    "max_image_bytes": _positive_int,
    "images_root": _path,
    "chunk_rows": _positive_int,
    "read_concurrency": _positive_int,
    "max_duration": _duration,
    "log_format": _choice("text", "json"),
    "log_file": _path,
    "log_level": _choice("debug", "info", "warning", "error"),
    "status_every": _positive_float,
    "metrics_addr": _host_port,
    "delimiter": _delimiter,
    "encoding": _encoding,
}
# Keys whose value is text: a YAML value read as a number (`partner_id: 012` is 10) is refused, quoting it as written.
_TEXT_KEYS = frozenset(
    {"env", "base_url", "partner_id", "checkpoint", "data_dir", "out", "user_id_pattern", "images_root",
     "log_format", "log_file", "log_level", "metrics_addr", "delimiter", "encoding"}
)  # fmt: skip
# Every setting's key: each is set in the YAML, as BACKFILL_<KEY> and by a flag. `columns` is a mapping, merged
# role by role across the layers (`columns:`, BACKFILL_COLUMNS=role=name,..., --column role=name).
_SETTING_KEYS = frozenset({*_PARSERS, "columns"})
# Keys only the YAML may set; `api_key` is named so the error can say why it is refused.
_YAML_ONLY = {"api_key_file"}
_CREDENTIALS = frozenset({"partner_id", "api_key", "api_key_file"})
_FIXES = {
    "partner_id": "set SMILE_PARTNER_ID or `partner_id:` (quoted) in the config file",
    "api_key": "export SMILE_API_KEY, or name a file holding it with `api_key_file:` in the config file",
    "metrics_addr": "give HOST:PORT (127.0.0.1:9464, [::1]:9464), or :PORT for every interface (:9464)",
    "delimiter": "give one character, e.g. ';' or '|', or tab",
    "encoding": "give the file's encoding, e.g. utf-8, cp1252, latin-1 or utf-16",
}


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    need_credentials: bool = True,
    defer_credentials: bool = False,
) -> Settings:
    """Resolve settings from every layer; the first problem raises ConfigError naming key, source, fix.

    `defer_credentials` (with need_credentials=False): a credential given but unusable doesn't raise; it is
    left unset and its error kept in `credential_problems`, for a caller that reports every problem at once.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    columns = {k: k for k in COLUMN_KEYS}
    column_sources: dict[str, str] = {}
    api_key: Secret | None = None
    deferred: list[ConfigError] = []

    def refuse(error: ConfigError) -> None:
        if not (defer_credentials and error.key in _CREDENTIALS):
            raise error
        deferred.append(error)

    def put(key: str, raw: object, source: str) -> None:
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            refuse(ConfigError(key, source, str(exc), _FIXES.get(key, f"correct {key} in {source}")))
            values.pop(key, None)  # an earlier layer's value is not the one meant: leave it unset
        sources[key] = source

    def key_from(read: Callable[[], Secret], source: str) -> None:
        nonlocal api_key
        try:
            api_key = read()
        except ConfigError as error:
            refuse(error)
            api_key = None
        sources["api_key"] = source

    def put_columns(raw: object, source: str, written: Mapping[str, str]) -> None:
        for role, name in _column_roles(raw, source, written).items():
            columns[role], column_sources[role] = name, source

    if config_file is not None:
        where = f"config file {config_file}"
        data, written = _read_yaml(config_file)
        for key, raw in data.items():
            if key == "api_key":
                refuse(ConfigError(
                    "api_key", where, "the API key must never be stored in the config file", _FIXES["api_key"]
                ))  # fmt: skip
                continue
            if key not in _SETTING_KEYS and key not in _YAML_ONLY:
                close = difflib.get_close_matches(str(key), [*_SETTING_KEYS, *_YAML_ONLY], n=1)
                hint = (
                    f"did you mean `{close[0]}`?"
                    if close
                    else f"known keys: {', '.join(sorted(_SETTING_KEYS))}"
                )
                raise ConfigError(str(key), where, "unknown key", f"remove it or fix its name ({hint})")
            if key in _TEXT_KEYS and isinstance(raw, bool | int | float | date):
                refuse(_not_text(key, raw, written.get(key), where))
                continue
            if key == "columns":
                put_columns(raw, where, written)
            elif key == "api_key_file":
                key_from(
                    functools.partial(_read_key_file, raw, config_file, where), f"{where} (api_key_file)"
                )
            else:
                put(key, raw, where)

    for key in _PARSERS:
        name = f"BACKFILL_{key.upper()}"
        if name in environ:
            put(key, environ[name], f"environment {name}")
    if "BACKFILL_COLUMNS" in environ:
        put_columns(environ["BACKFILL_COLUMNS"], "environment BACKFILL_COLUMNS", {})
    warnings = environment_warnings(environ)
    if "SMILE_PARTNER_ID" in environ:
        put("partner_id", environ["SMILE_PARTNER_ID"], "environment SMILE_PARTNER_ID")
    if environ.get("SMILE_API_KEY"):
        key_from(lambda: _api_key(environ["SMILE_API_KEY"], "environment SMILE_API_KEY"),
                 "environment SMILE_API_KEY")  # fmt: skip
    if "data_dir" not in values:
        values["data_dir"] = _data_dir(environ)
        sources["data_dir"] = (
            "XDG_DATA_HOME"
            if os.path.isabs(environ.get("XDG_DATA_HOME") or "")
            else "default (~/.local/share)"
        )

    for key, raw in (flags or {}).items():
        if key == "columns":
            if raw:  # --column, repeatable: a tuple of ROLE=NAME, empty when not given
                put_columns(raw, "flag --column", {})
        elif raw is not None:
            put(key, raw, f"flag --{key.replace('_', '-')}")

    if "checkpoint" not in values:
        # Said where the path comes from: a user who sees it change with the partner or the URL knows why.
        sources["checkpoint"] = (
            DERIVED_LEDGER if values.get("partner_id") else f"{DERIVED_LEDGER}: no partner ID is set"
        )
    if "base_url" not in values:
        env = values.get("env", Settings.env)
        values["base_url"] = ENVIRONMENTS[env]
        sources["base_url"] = f"env={env}"  # read after "from" in every message: "(from env=local)"
    values["columns"] = _distinct(columns, column_sources)
    sources["columns"] = _columns_source(column_sources)
    values["api_key"] = api_key or Secret("")
    for key in [f.name for f in fields(Settings)]:
        sources.setdefault(key, "default")
    settings = Settings(**values, sources=sources, warnings=warnings, credential_problems=tuple(deferred))
    _check_whole(settings, need_credentials)
    return settings


# BACKFILL_* variables that are not settings but are read elsewhere: never warned about.
# BACKFILL_TEST_CRASH_AT: the crash suite's test mode (`backfill.run.crash.CRASH_ENV`).
KNOWN_NON_SETTINGS = frozenset({"BACKFILL_TEST_CRASH_AT"})
_ENV_PREFIX = "BACKFILL_"


def environment_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    """One line per BACKFILL_* variable that is not a setting (a typo is ignored, so it must be said)."""
    return tuple(_unknown_variable(name) for name in sorted(environ) if _looks_unknown(name))


def _looks_unknown(name: str) -> bool:
    return (
        name.upper().startswith(_ENV_PREFIX)
        and name not in KNOWN_NON_SETTINGS
        and not (name.startswith(_ENV_PREFIX) and name[len(_ENV_PREFIX) :].lower() in _SETTING_KEYS)
    )


def _unknown_variable(name: str) -> str:
    """Why the environment variable `name` (BACKFILL_-prefixed, not a setting) was ignored, and the likely fix."""
    key = name[len(_ENV_PREFIX) :].lower()
    said = f"environment {name} is not a setting and was ignored"
    if name.upper() != name and key in _SETTING_KEYS:
        return f"{said} (did you mean {_ENV_PREFIX}{key.upper()}? names are case-sensitive)"
    if key == "api_key":
        return f"{said}: the API key is read from SMILE_API_KEY only"
    if key in _YAML_ONLY:
        return f"{said}: {key} can only be set in the config file (--config)"
    close = difflib.get_close_matches(key, list(_SETTING_KEYS), n=1)
    return f"{said} (did you mean {_ENV_PREFIX}{close[0].upper()}?)" if close else said


def _check_whole(s: Settings, need_credentials: bool) -> None:
    if need_credentials:
        # A dry run signs every request it builds: without credentials it would check nothing it claims to.
        dry = (
            "; a dry run signs every request with SMILE_PARTNER_ID and SMILE_API_KEY, so it needs both "
            "(`backfill validate` checks the manifest without credentials)"
            if s.dry_run
            else ""
        )
        if not s.partner_id:
            raise ConfigError(
                "partner_id", s.sources["partner_id"], "no partner ID is set", _FIXES["partner_id"] + dry
            )
        if not s.api_key:
            raise ConfigError("api_key", s.sources["api_key"], "no API key is set", _FIXES["api_key"] + dry)
    if s.backoff_max < s.backoff_initial:
        raise ConfigError(
            "backoff_max",
            s.sources["backoff_max"],
            f"{s.backoff_max} is below backoff_initial ({s.backoff_initial})",
            "make backoff_max at least backoff_initial",
        )
    if s.env == "production" and s.base_url.startswith("http://"):
        raise ConfigError(
            "base_url",
            s.sources["base_url"],
            "production must be reached over https (TLS verification is always on)",
            "use the https URL, or drop --base-url to use the documented one",
        )
    # A label and a URL that disagree about which Smile ID is meant: one of them is a mistake, and guessing
    # which could send real users to the sandbox or rehearsal data to production. Private URLs (a proxy, the
    # local emulator) are the user's to label.
    for other in ("sandbox", "production"):
        if other != s.env and s.endpoint == endpoint_of(ENVIRONMENTS[other]):
            raise ConfigError(
                "base_url", s.sources["base_url"],
                f"{s.base_url} is Smile ID's {other} API, but env is {s.env} (from {s.sources['env']})",
                f"make them agree: set env to {other}, or remove base_url so env {s.env}'s documented URL is used",
            )  # fmt: skip


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The file's mapping, and the text of each plain scalar in it as written (see `_plain_scalars`)."""
    where = f"config file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", where, f"can't read it ({exc.strerror})", "check the path") from exc
    # Composed, then constructed, so the text of each plain scalar as written is kept beside its value: a
    # `partner_id: 012` that YAML reads as the number 10 is reported as the 012 the user typed.
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        # Only the position and the problem: the parser's message quotes the line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(
            "--config", where, f"not valid YAML{at}: {problem}", "fix the YAML syntax"
        ) from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("--config", where, "the top level must be a mapping of key: value", "see config/")
    return data, _plain_scalars(node)


def _plain_scalars(node: yaml.Node | None, prefix: str = "") -> dict[str, str]:
    """{dotted key: the unquoted scalar's text exactly as written}, for the mappings in `node`."""
    written: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if isinstance(value, yaml.ScalarNode) and value.style is None:
                written[prefix + key.value] = value.value
            elif isinstance(value, yaml.MappingNode):
                written.update(_plain_scalars(value, f"{prefix}{key.value}."))
    return written


def _not_text(key: str, raw: object, written: str | None, where: str) -> ConfigError:
    """The error for a YAML value that should be text but was read as something else (012 as the number 10)."""
    as_written = written if written is not None else str(raw)
    if isinstance(raw, bool):
        read_as = "a true/false value"
    elif isinstance(raw, int | float):
        read_as = f"the number {raw}"
        digits = as_written.lstrip("+-").lower()
        why = (
            "0x makes it hexadecimal" if digits.startswith("0x")
            else "0b makes it binary" if digits.startswith("0b")
            else "YAML 1.1 reads a:b as base 60" if ":" in digits
            else "a leading 0 makes it octal" if re.fullmatch(r"0[0-7_]+", digits)
            else "YAML drops the _ in a number" if "_" in digits
            else ""
        )  # fmt: skip
        read_as += f" ({why})" if why else ""
    elif isinstance(raw, date):
        read_as = "a date"
    else:
        read_as = f"a {type(raw).__name__}"
    problem = f"{as_written} was read as {read_as}, not text"
    return ConfigError(key, where, problem, f"quote it: {key.rsplit('.', 1)[-1]}: {json.dumps(as_written)}")


def _column_roles(raw: object, where: str, written: Mapping[str, str]) -> dict[str, str]:
    """{role: the manifest's column name} for the roles one layer maps: the YAML's mapping, BACKFILL_COLUMNS's
    `role=name,role=name`, or --column's `role=name` values."""
    example = _columns_example(where)
    if isinstance(raw, str):
        raw = [pair for pair in raw.split(",") if pair.strip()]
    if isinstance(raw, list | tuple):
        pairs: dict[str, str] = {}
        for item in raw:
            role, equals, name = str(item).partition("=")
            if not equals:
                raise ConfigError("columns", where, f"{item!r} is not ROLE=NAME", f"write it as {example}")
            if role.strip() in pairs:
                raise ConfigError("columns", where, f"{role.strip()} is mapped twice", "map each role once")
            pairs[role.strip()] = name
        raw = pairs
    if not isinstance(raw, dict):
        raise ConfigError("columns", where, "must be a mapping", f"e.g. {example}")
    out: dict[str, str] = {}
    for role, name in raw.items():
        if role not in COLUMN_KEYS:
            close = difflib.get_close_matches(str(role), COLUMN_KEYS, n=1)
            guess = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                "columns", where, f"{str(role)!r} is not a column role{guess}",
                f"use only {', '.join(COLUMN_KEYS)}, e.g. {example}",
            )  # fmt: skip
        if isinstance(name, bool | int | float | date):
            raise _not_text(f"columns.{role}", name, written.get(f"columns.{role}"), where)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"columns.{role}", where, f"{name!r} is not a column name",
                f"give the manifest header's name for {role}, e.g. {example}",
            )  # fmt: skip
        out[role] = name.strip()
    return out


def _columns_example(where: str) -> str:
    """How a column mapping is written where this one came from."""
    if where.startswith("flag"):
        return "--column user_id=customer_ref"
    if where.startswith("environment"):
        return "BACKFILL_COLUMNS=user_id=customer_ref,image_path=selfie"
    return "columns: {user_id: customer_ref}"


def _distinct(columns: dict[str, str], role_sources: Mapping[str, str]) -> dict[str, str]:
    """`columns`, once no two roles read the same column (each merged from its own layer, they may clash)."""
    for a, b in ((a, b) for i, a in enumerate(COLUMN_KEYS) for b in COLUMN_KEYS[i + 1 :]):
        if columns[a] == columns[b]:
            where = " and ".join(dict.fromkeys(role_sources.get(r, "default") for r in (a, b)))
            raise ConfigError(
                "columns", where, f"{a} and {b} both map to the column {columns[a]!r}",
                "map each role to its own column",
            )  # fmt: skip
    return columns


def _columns_source(role_sources: Mapping[str, str]) -> str:
    """Where the column mapping came from: one source, or each mapped role's own when the layers differ."""
    given = set(role_sources.values())
    if len(given) <= 1:
        return next(iter(given), "default")
    return "; ".join(f"{role} from {role_sources[role]}" for role in COLUMN_KEYS if role in role_sources)


def _read_key_file(raw: object, config_file: Path, where: str) -> Secret:
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError("api_key_file", where, "must be a path", "give the path of a file holding the key")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = config_file.parent / path
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            "api_key_file", where, f"can't read {path}", "check the path and permissions"
        ) from exc
    if not key:
        raise ConfigError("api_key_file", where, f"{path} is empty", "put the API key in it")
    return _api_key(key, f"{where} (api_key_file {path})")


def _api_key(raw: str, source: str) -> Secret:
    """The key as a Secret, or a ConfigError that describes what is wrong without ever showing the value."""
    key = raw.strip()
    # Registered before any check: should a message ever quote it by accident, it is scrubbed all the same.
    secret = Secret(key)
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        bad = next((c for c in key if not (c.isascii() and c.isprintable()) or c.isspace()), " ")
        what = f"U+{ord(bad):04X}"
        raise ConfigError(
            "api_key", source, f"the key contains a character that can't be in an API key ({what})",
            "copy the key again from the Smile ID portal, as printable text on one line",
        )  # fmt: skip
    if len(key) > 4096:
        raise ConfigError(
            "api_key", source, f"the key is {len(key):,} characters long, not an API key (is it a file's contents?)",
            "copy the key alone from the Smile ID portal",
        )  # fmt: skip
    return secret


def _data_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_DATA_HOME/backfill, else ~/.local/share/backfill. A relative XDG_DATA_HOME is ignored, as the XDG
    spec says: it would put the ledger under whatever folder the command ran from."""
    xdg = environ.get("XDG_DATA_HOME") or ""
    home = environ.get("HOME") or os.path.expanduser("~")
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "share")
    return Path(base) / "backfill"
