"""Settings: defaults < YAML file < environment < flags, validated and frozen before the run starts."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import redact
from .errors import ConfigError

ENVIRONMENTS: dict[str, str] = {
    "local": "http://127.0.0.1:8080/v1",
    "sandbox": "https://testapi.smileidentity.com/v1",
    "production": "https://api.smileidentity.com/v1",
}
COLUMN_KEYS = ("user_id", "user_created_at", "image_path")


class Secret:
    """A value that never shows itself in repr, str, logs or tracebacks; `reveal()` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        redact.register(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


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
    checkpoint: Path | None = None
    data_dir: Path = Path("~/.local/share/backfill")  # where default ledgers live; resolved at load
    out: Path = Path("backfill-out")
    dry_run: bool = False
    limit: int | None = None
    progress: bool = True
    columns: Mapping[str, str] = field(default_factory=lambda: {k: k for k in COLUMN_KEYS})
    user_id_pattern: str = r"[A-Za-z0-9_-]+"
    max_image_bytes: int = 5 * 1024 * 1024
    images_root: Path | None = None
    chunk_rows: int = 10_000
    max_duration: float | None = None  # seconds; stop starting new rows after this long
    log_format: str = "text"
    log_file: Path | None = None
    log_level: str = "info"
    status_every: float = 30.0  # seconds between one-line status logs when there is no progress bar
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def endpoint(self) -> str:
        """scheme://host:port of the API actually used: what a ledger is bound to, whatever the env label."""
        return endpoint_of(self.base_url)

    def checkpoint_path(self) -> Path:
        """The ledger: the one named, else one per partner and endpoint in the user's data folder.

        Not in the current folder: the same command run from anywhere must find the same ledger, or a re-run
        from elsewhere would start afresh and send every enrolled user again.
        """
        if self.checkpoint is not None:
            return Path(os.path.abspath(self.checkpoint))
        parts = urlsplit(self.base_url)
        host = f"{parts.hostname or 'nohost'}_{_port(parts)}"
        name = _SAFE.sub("_", f"{self.partner_id or 'nopartner'}@{host}")
        return self.data_dir / "ledgers" / f"{name}.sqlite"

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values with secrets masked, for summaries and `config show`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "sources":
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
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise ValueError(f"{raw!r} is not text")
    if isinstance(raw, int):
        # YAML reads `partner_id: 085` as 85: silently signing with "85" would fail every request.
        raise ValueError(f'{raw!r} was read as a number; quote it so leading zeros survive, e.g. "0{raw}"')
    if not raw.strip():
        raise ValueError("it is empty")
    return raw.strip()


def _path(raw: object) -> Path:
    return Path(raw if isinstance(raw, os.PathLike) else _text(raw)).expanduser()


def _env_name(raw: object) -> str:
    value = _text(raw).lower()
    if value not in ENVIRONMENTS:
        raise ValueError(f"{raw!r} is not one of {', '.join(ENVIRONMENTS)}")
    return value


def _url(raw: object) -> str:
    value = _text(raw).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{raw!r} is not an http(s) URL")
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
    "checkpoint": _path,
    "data_dir": _path,
    "out": _path,
    "dry_run": _boolean,
    "limit": _positive_int,
    "progress": _boolean,
    "user_id_pattern": _pattern,
    "max_image_bytes": _positive_int,
    "images_root": _path,
    "chunk_rows": _positive_int,
    "max_duration": _duration,
    "log_format": _choice("text", "json"),
    "log_file": _path,
    "log_level": _choice("debug", "info", "warning", "error"),
    "status_every": _positive_float,
}
# Keys only the YAML may set; `api_key` is named so the error can say why it is refused.
_YAML_ONLY = {"columns", "api_key_file"}
_FIXES = {
    "partner_id": "set SMILE_PARTNER_ID or `partner_id:` (quoted) in the config file",
    "api_key": "export SMILE_API_KEY, or name a file holding it with `api_key_file:` in the config file",
}


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    need_credentials: bool = True,
) -> Settings:
    """Resolve settings from every layer; the first problem raises ConfigError naming key, source, fix."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    columns = {k: k for k in COLUMN_KEYS}
    api_key: Secret | None = None

    def put(key: str, raw: object, source: str) -> None:
        try:
            values[key] = _PARSERS[key](raw)
        except ValueError as exc:
            raise ConfigError(key, source, str(exc), _FIXES.get(key, f"correct {key} in {source}")) from None
        sources[key] = source

    if config_file is not None:
        where = f"config file {config_file}"
        data = _read_yaml(config_file)
        for key, raw in data.items():
            if key == "api_key":
                raise ConfigError(
                    "api_key", where, "the API key must never be stored in the config file", _FIXES["api_key"]
                )
            if key not in _PARSERS and key not in _YAML_ONLY:
                close = difflib.get_close_matches(str(key), [*_PARSERS, *_YAML_ONLY], n=1)
                hint = (
                    f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(sorted(_PARSERS))}"
                )
                raise ConfigError(str(key), where, "unknown key", f"remove it or fix its name ({hint})")
            if key == "columns":
                columns = _columns(raw, where)
                sources["columns"] = where
            elif key == "api_key_file":
                api_key = _read_key_file(raw, config_file, where)
                sources["api_key"] = f"{where} (api_key_file)"
            else:
                put(key, raw, where)

    for key in _PARSERS:
        name = f"BACKFILL_{key.upper()}"
        if name in environ:
            put(key, environ[name], f"environment {name}")
    if "SMILE_PARTNER_ID" in environ:
        put("partner_id", environ["SMILE_PARTNER_ID"], "environment SMILE_PARTNER_ID")
    if environ.get("SMILE_API_KEY"):
        api_key = _api_key(environ["SMILE_API_KEY"], "environment SMILE_API_KEY")
        sources["api_key"] = "environment SMILE_API_KEY"
    if "data_dir" not in values:
        values["data_dir"] = _data_dir(environ)
        sources["data_dir"] = (
            "XDG_DATA_HOME" if os.path.isabs(environ.get("XDG_DATA_HOME") or "") else "default (~/.local/share)"
        )

    for key, raw in (flags or {}).items():
        if raw is not None:
            put(key, raw, f"flag --{key.replace('_', '-')}")

    if "base_url" not in values:
        env = values.get("env", Settings.env)
        values["base_url"] = ENVIRONMENTS[env]
        sources["base_url"] = f"derived from env={env}"
    values["columns"] = columns
    values["api_key"] = api_key or Secret("")
    for key in [f.name for f in fields(Settings)]:
        sources.setdefault(key, "default")
    settings = Settings(**values, sources=sources)
    _check_whole(settings, need_credentials)
    return settings


def _check_whole(s: Settings, need_credentials: bool) -> None:
    if need_credentials and not s.dry_run:
        if not s.partner_id:
            raise ConfigError(
                "partner_id", s.sources["partner_id"], "no partner ID is set", _FIXES["partner_id"]
            )
        if not s.api_key:
            raise ConfigError("api_key", s.sources["api_key"], "no API key is set", _FIXES["api_key"])
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


def _read_yaml(path: Path) -> dict[str, Any]:
    where = f"config file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", where, f"can't read it ({exc.strerror})", "check the path") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the position and the problem: the parser's message quotes the line, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(
            "--config", where, f"not valid YAML{at}: {problem}", "fix the YAML syntax"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", where, "the top level must be a mapping of key: value", "see config/")
    return data


def _columns(raw: object, where: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ConfigError("columns", where, "must be a mapping", "e.g. columns: {user_id: customer_ref}")
    unknown = set(map(str, raw)) - set(COLUMN_KEYS)
    if unknown:
        raise ConfigError(
            "columns",
            where,
            f"unknown column role(s) {sorted(unknown)}",
            f"use only {', '.join(COLUMN_KEYS)}",
        )
    out = {k: k for k in COLUMN_KEYS}
    for role, name in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"columns.{role}", where, f"{name!r} is not a column name", "give the CSV header"
            )
        out[str(role)] = name.strip()
    if len(set(out.values())) != len(out):
        raise ConfigError(
            "columns", where, "two roles map to the same column", "map each role to its own column"
        )
    return out


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
