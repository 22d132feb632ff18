"""Settings: defaults < YAML file < environment < flags, validated and frozen before the run starts."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import date
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml

from .errors import ConfigError
from .redact import Secret
from .vocab import UserIds

ENVIRONMENTS: dict[str, str] = {
    "local": "http://127.0.0.1:8080/v1",
    "sandbox": "https://testapi.smileidentity.com/v1",
    "production": "https://api.smileidentity.com/v1",
}
COLUMN_KEYS = ("user_id", "user_created_at", "image_path")
DERIVED_LEDGER = (
    "partner_id and base_url"  # read after "from", as every source is: "(from partner_id and base_url)"
)
DATA_DIR = Path("~/.local/share/backfill")  # where default ledgers live, unless XDG_DATA_HOME says otherwise
ENV_PREFIX = "BACKFILL_"
# Where a setting came from when a Python caller gave it as a keyword (backfill.run(manifest, rate=20)).
ARGUMENT = "python argument"


# --- parsing of single values: each returns the value or raises ValueError with a human reason ---


def _whole(raw: object) -> int:
    if isinstance(raw, bool):
        raise ValueError("expected a whole number")
    try:
        return int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise ValueError(f"{raw!r} is not a whole number") from None


def _positive_int(raw: object) -> int:
    value = _whole(raw)
    if value < 1:
        raise ValueError(f"{value} is not at least 1")
    return value


def _count(raw: object) -> int:
    value = _whole(raw)
    if value < 0:
        raise ValueError(f"{value} is negative")
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


def _ledger(raw: object) -> Path | str:
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


def _duration_or_zero(raw: object) -> float:
    """A duration as `_duration` reads it, or none at all (`0`, `0s`)."""
    text = str(raw).strip().lower()
    try:
        zero = not isinstance(raw, bool) and float(text[:-1] if text[-1:] in ("s", "m", "h") else text) == 0
    except ValueError:
        zero = False
    return 0.0 if zero else _duration(raw)


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


# --- what a setting is: declared once, on its field; load_settings, the CLI's options and the docs read it ---


class Takes(StrEnum):
    """What a setting's flag takes on the command line. Whatever it takes, the setting's own parser reads it."""

    TEXT = "text"
    FILE = "file"  # a path, completed by the shell; a folder there is refused
    FOLDER = "folder"  # a path, completed by the shell; a file there is refused
    SWITCH = "switch"  # no value: given, it sets the setting to `Flag.value`
    REPEATED = "repeated"  # one item each time it is given (--column ROLE=NAME --column ROLE=NAME)


@dataclass(frozen=True, kw_only=True)
class Flag:
    """A setting's command-line option, as backfill/cli makes it."""

    name: str = ""  # "" is --<key with dashes>
    metavar: str | None = None
    takes: Takes = Takes.TEXT
    value: bool = True  # what a SWITCH sets the setting to
    help: str = ""  # "" is the setting's own help
    default_shown: str | None = None  # --help's default when it isn't the field's own; "" shows none


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One setting: how a value for it is read, and each place it may come from besides its default."""

    key: str = ""  # the field's name (filled in by SPECS)
    help: str  # what it is, in one sentence: the flag's help and the docs' table
    # A valid value other than the default, as written in any source: the tests set the setting from each with it.
    example: str
    flag: Flag | None
    no_flag: str = ""  # why there is no flag: a setting without one says so, deliberately
    parse: Callable[[object], Any] | None = None  # raises ValueError with the reason; None: one of `choices`
    choices: tuple[str, ...] = ()
    # Text: a YAML value read as a number (`partner_id: 012` is 10) is refused, quoted as it was written.
    text: bool = False
    env: tuple[str, ...] | None = None  # its variables (the later wins); None: BACKFILL_<KEY>
    in_file: bool = True  # whether the YAML file may set it
    aliases: tuple[str, ...] = ()  # old names, still read everywhere the name is (YAML, BACKFILL_*, flags)
    secret: bool = False  # never shown: masked in summaries, `config show` and every message
    fix: str = ""  # the fix an error about it gives; "": correct it where it came from

    def __post_init__(self) -> None:
        if (self.flag is None) == (not self.no_flag):
            raise TypeError(f"a setting has a flag or says why not (no_flag=...), not both: {self.help!r}")

    @property
    def variables(self) -> tuple[str, ...]:
        """Every environment variable read for it: old names first, so that the current name's source wins."""
        own = self.env if self.env is not None else (f"{ENV_PREFIX}{self.key.upper()}",)
        return (*(f"{ENV_PREFIX}{a.upper()}" for a in self.aliases if self.env is None), *own)

    @property
    def flag_name(self) -> str:
        return (self.flag.name if self.flag else "") or f"--{self.key.replace('_', '-')}"

    @property
    def old_flags(self) -> tuple[str, ...]:
        """The flags of its old names, hidden from --help and read as this setting."""
        return tuple(f"--{alias.replace('_', '-')}" for alias in self.aliases)

    def read(self, raw: object) -> Any:
        """The value `raw` gives this setting, or ValueError with a reason that names no secret."""
        if self.parse is not None:
            return self.parse(raw)
        if self.choices:
            return _choice(*self.choices)(raw)
        raise TypeError(f"{self.key} is read by load_settings itself")


# The key of a Settings field's metadata that holds its Spec: `field(default=..., metadata={SETTING: Spec(...)})`.
SETTING = "backfill.setting"


# Why a setting has no flag (each setting says it, so a new one can't lack a flag by accident).
CREDENTIAL = "a credential: from the environment or the file, never the command line, which `ps` shows to all"
TUNING = "tuning that rarely changes between runs: set it once, in the file or the environment"
MANIFEST_RULE = (
    "a rule for every manifest of a migration: set it once, in the file, so that every run keeps it"
)
LEDGER_HELP = (
    "The ledger: a SQLite file, or postgresql://user@host:port/dbname for a fleet of runs sharing one "
    "(password from PGPASSWORD, ~/.pgpass or a service file)."
)


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, resolved. `sources` says where each value came from (for messages).

    Each setting is declared once, here: its field's Spec (metadata[SETTING]) gives its parser and where it may
    come from (a YAML key, BACKFILL_<KEY>, a flag); load_settings, the CLI's options and `config show` follow it,
    and tests hold docs/configuration.md to it.
    """

    env: str = field(
        default="sandbox",
        metadata={
            SETTING: Spec(
                help="Which API to use.", example="local", choices=tuple(ENVIRONMENTS), text=True, flag=Flag()
            )
        },
    )
    base_url: str = field(
        default=ENVIRONMENTS["sandbox"],
        metadata={
            SETTING: Spec(
                help="API root, e.g. http://127.0.0.1:8080/v1 (overrides --env's URL).",
                example="https://proxy.example/v1",
                parse=_url,
                text=True,
                flag=Flag(metavar="URL", default_shown=""),
            )
        },
    )
    partner_id: str = field(
        default="",
        metadata={
            SETTING: Spec(
                help="Your Smile ID partner ID.",
                example="085",
                parse=_text,
                text=True,
                env=("BACKFILL_PARTNER_ID", "SMILE_PARTNER_ID"),
                flag=None,
                no_flag=CREDENTIAL,
                fix="set SMILE_PARTNER_ID or `partner_id:` (quoted) in the config file",
            )
        },
    )
    api_key: Secret = field(
        default_factory=lambda: Secret(""),
        metadata={
            SETTING: Spec(
                help="Your Smile ID API key; in the file, `api_key_file:` names a file that holds it.",
                example="k-example-key",
                env=("SMILE_API_KEY",),
                in_file=False,
                secret=True,
                flag=None,
                no_flag=CREDENTIAL,
                fix="export SMILE_API_KEY, or name a file holding it with `api_key_file:` in the config file",
            )
        },
    )
    concurrency: int = field(
        default=8,
        metadata={
            SETTING: Spec(
                help="Requests in flight at once.", example="16", parse=_positive_int, flag=Flag(metavar="N")
            )
        },
    )
    rate: float = field(
        default=10.0,
        metadata={
            SETTING: Spec(
                help="Requests per second across all workers, retries included.",
                example="25",
                parse=_positive_float,
                flag=Flag(metavar="R"),
            )
        },
    )
    max_attempts: int = field(
        default=5,
        metadata={
            SETTING: Spec(
                help="Attempts per row before giving up on transient errors.",
                example="3",
                parse=_positive_int,
                flag=Flag(metavar="N"),
            )
        },
    )
    timeout: float = field(
        default=60.0,
        metadata={
            SETTING: Spec(
                help="Seconds to wait for one answer.",
                example="90",
                parse=_positive_float,
                flag=Flag(metavar="SECONDS"),
            )
        },
    )
    connect_timeout: float = field(
        default=10.0,
        metadata={
            SETTING: Spec(
                help="Seconds to wait for a connection to the API.",
                example="5",
                parse=_positive_float,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    # None: this machine's default CAs. Below every source of its own comes SSL_CERT_FILE, which OpenSSL reads.
    ca_bundle: Path | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="A PEM file of the CAs the API's certificate must chain to (a private CA, a proxy that re-signs "
                "TLS), instead of this machine's; default: SSL_CERT_FILE, when set.",
                example="/etc/backfill/corporate-ca.pem",
                parse=_path,
                text=True,
                flag=Flag(metavar="PATH", takes=Takes.FILE),
            )
        },
    )
    backoff_initial: float = field(
        default=0.5,
        metadata={
            SETTING: Spec(
                help="First wait before a retry, in seconds; exponential with jitter after that.",
                example="1",
                parse=_positive_float,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    backoff_max: float = field(
        default=30.0,
        metadata={
            SETTING: Spec(
                help="Longest wait between retries, in seconds (a 429's Retry-After is honoured as given).",
                example="60",
                parse=_positive_float,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    fail_threshold: float = field(
        default=0.5,
        metadata={
            SETTING: Spec(
                help="Stop when this fraction of recent rows fail.",
                example="0.2",
                parse=_fraction,
                flag=Flag(metavar="F"),
            )
        },
    )
    # A SQLite file, or a postgresql:// URL (str) for a fleet's ledger; None: the default one (ledger_path).
    ledger: Path | str | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help=LEDGER_HELP,
                example="/srv/backfill/ledger-085.sqlite",
                parse=_ledger,
                text=True,
                aliases=("checkpoint",),
                flag=Flag(
                    metavar="PATH|URL", default_shown=f"{DATA_DIR}/ledgers/<partner_id>@<host>_<port>.sqlite"
                ),
            )
        },
    )
    # The owner of a claim renews it a third as often.
    lease: float = field(
        default=30.0,
        metadata={
            SETTING: Spec(
                help="PostgreSQL ledger: seconds a claim on rows lasts unless renewed; a dead run's rows return after it.",
                example="10",
                parse=_positive_float,
                flag=Flag(metavar="SECONDS"),
            )
        },
    )
    ledger_outage: float = field(
        default=60.0,
        metadata={
            SETTING: Spec(
                help="PostgreSQL ledger: seconds a lost database is waited for (a restart, a failover) before the run "
                "stops with exit 2.",
                example="120",
                parse=_positive_float,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    # Resolved at load: $XDG_DATA_HOME/backfill, else ~/.local/share/backfill.
    data_dir: Path = field(
        default=DATA_DIR,
        metadata={
            SETTING: Spec(
                help="Where default ledgers live (default: $XDG_DATA_HOME/backfill, else ~/.local/share/backfill).",
                example="/srv/backfill",
                parse=_path,
                text=True,
                flag=None,
                no_flag="where every command finds the default ledgers: one place for all of them, so the file or "
                "the environment",
            )
        },
    )
    out: Path = field(
        default=Path("backfill-out"),
        metadata={
            SETTING: Spec(
                help="Output folder: each run writes a new folder inside it.",
                example="/srv/backfill/out",
                parse=_path,
                text=True,
                flag=Flag(takes=Takes.FOLDER, help="Output folder."),
            )
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            SETTING: Spec(
                help="Validate, build and sign every request; send none.",
                example="true",
                parse=_boolean,
                flag=Flag(takes=Takes.SWITCH),
            )
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="Send at most N rows (a canary).",
                example="100",
                parse=_positive_int,
                flag=Flag(metavar="N"),
            )
        },
    )
    progress: bool = field(
        default=True,
        metadata={
            SETTING: Spec(
                help="Show a progress bar when stderr is a terminal.",
                example="false",
                parse=_boolean,
                flag=Flag(name="--no-progress", takes=Takes.SWITCH, value=False, help="No progress bar."),
            )
        },
    )
    # Merged role by role across the layers (see _column_roles).
    columns: Mapping[str, str] = field(
        default_factory=lambda: {k: k for k in COLUMN_KEYS},
        metadata={
            SETTING: Spec(
                help="The manifest's column for each of user_id, user_created_at and image_path, as ROLE=NAME.",
                example="user_id=customer_ref",
                flag=Flag(
                    name="--column",
                    metavar="ROLE=NAME",
                    takes=Takes.REPEATED,
                    help="The manifest's column for user_id, user_created_at or image_path, e.g. user_id=customer_ref "
                    "(repeat it for each one renamed).",
                ),
            )
        },
    )
    delimiter: str = field(
        default=",",
        metadata={
            SETTING: Spec(
                help="The manifest's one character between values, e.g. ';', '|' or tab.",
                example=";",
                parse=_delimiter,
                text=True,
                flag=Flag(metavar="CHAR"),
                fix="give one character, e.g. ';' or '|', or tab",
            )
        },
    )
    # UTF-8 is read with or without a byte order mark.
    encoding: str = field(
        default="utf-8",
        metadata={
            SETTING: Spec(
                help="The manifest's text encoding, e.g. cp1252 or utf-16.",
                example="cp1252",
                parse=_encoding,
                text=True,
                flag=Flag(metavar="NAME"),
                fix="give the file's encoding, e.g. utf-8, cp1252, latin-1 or utf-16",
            )
        },
    )
    # auto: by the file name's extension (.jsonl/.ndjson, .parquet; anything else is CSV), a URL's too.
    manifest_format: str = field(
        default="auto",
        metadata={
            SETTING: Spec(
                help="The manifest's format: csv, jsonl or parquet; auto goes by its extension.",
                example="jsonl",
                choices=("auto", "csv", "jsonl", "parquet"),
                text=True,
                flag=Flag(metavar="FORMAT"),
            )
        },
    )
    user_id_pattern: str = field(
        default=r"[A-Za-z0-9_-]+",
        metadata={
            SETTING: Spec(
                help="A regular expression every user_id must match whole.",
                example="[0-9]+",
                parse=_pattern,
                text=True,
                flag=None,
                no_flag=MANIFEST_RULE,
            )
        },
    )
    max_image_bytes: int = field(
        default=5 * 1024 * 1024,
        metadata={
            SETTING: Spec(
                help="The largest photo, in bytes of file (the API's documented limit is 5 MB).",
                example="1048576",
                parse=_positive_int,
                flag=None,
                no_flag=MANIFEST_RULE,
            )
        },
    )
    normalize: bool = field(
        default=False,
        metadata={
            SETTING: Spec(
                help="Normalise photos in memory before sending: HEIC, WebP, TIFF, BMP and GIF to JPEG, EXIF "
                "rotation applied, scaled down to fit max_image_bytes, metadata removed (needs "
                "backfill[images]).",
                example="true",
                parse=_boolean,
                flag=Flag(takes=Takes.SWITCH),
            )
        },
    )
    max_source_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={
            SETTING: Spec(
                help="With normalize: the largest photo read, in bytes of file, before it is normalised.",
                example="104857600",
                parse=_positive_int,
                flag=None,
                no_flag=MANIFEST_RULE,
            )
        },
    )
    images_root: Path | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="When set, every image must resolve inside this folder.",
                example="/data/selfies",
                parse=_path,
                text=True,
                flag=None,
                no_flag=MANIFEST_RULE,
            )
        },
    )
    max_ids_per_photo: int = field(
        default=1,
        metadata={
            SETTING: Spec(
                help="The most user_ids one photo (by content) may be sent for; rows of a photo shared by more "
                "are rejected as shared_photo (0: no limit, not checked).",
                example="2",
                parse=_count,
                flag=None,
                no_flag=MANIFEST_RULE,
            )
        },
    )
    chunk_rows: int = field(
        default=10_000,
        metadata={
            SETTING: Spec(
                help="Manifest rows read at a time; memory stays flat however long the manifest.",
                example="500",
                parse=_positive_int,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    read_concurrency: int = field(
        default=32,
        metadata={
            SETTING: Spec(
                help="Photos in object storage checked at once (ranged reads), apart from --concurrency.",
                example="8",
                parse=_positive_int,
                flag=Flag(metavar="N"),
            )
        },
    )
    max_duration: float | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="Stop starting new rows after this long (3600, 90m, 2h); resumable.",
                example="90m",
                parse=_duration,
                flag=Flag(metavar="DURATION"),
            )
        },
    )
    stop_timeout: float = field(
        default=20.0,
        metadata={
            SETTING: Spec(
                help="Seconds a stop (a signal, --max-duration) waits for answers in flight before leaving their "
                "rows in doubt for a re-run to settle (20, 1m; 0: not at all).",
                example="5",
                parse=_duration_or_zero,
                flag=Flag(metavar="SECONDS"),
            )
        },
    )
    log_format: str = field(
        default="text",
        metadata={
            SETTING: Spec(
                help="text, or json: one object per line.",
                example="json",
                choices=("text", "json"),
                text=True,
                flag=Flag(),
            )
        },
    )
    log_file: Path | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="Also log every event here (appended).",
                example="/var/log/backfill.log",
                parse=_path,
                text=True,
                flag=Flag(takes=Takes.FILE),
            )
        },
    )
    operator: str = field(
        default="",
        metadata={
            SETTING: Spec(
                help="Who runs the tool, for the audit trail in the ledger and summary.json (default: the OS user).",
                example="jane.doe@bank.example",
                parse=_text,
                text=True,
                flag=Flag(),
            )
        },
    )
    log_user_ids: str = field(
        default=UserIds.PLAIN.value,
        metadata={
            SETTING: Spec(
                help="How log lines name a user: plain, hashed (keyed by the ledger's secret; `backfill "
                "find-user` prints an ID's) or omit.",
                example="hashed",
                choices=tuple(u.value for u in UserIds),
                text=True,
                flag=Flag(),
            )
        },
    )
    log_level: str = field(
        default="info",
        metadata={
            SETTING: Spec(
                help="The least severe event logged.",
                example="debug",
                choices=("debug", "info", "warning", "error"),
                text=True,
                flag=Flag(),
            )
        },
    )
    status_every: float = field(
        default=30.0,
        metadata={
            SETTING: Spec(
                help="Seconds between one-line status logs when there is no progress bar.",
                example="5",
                parse=_positive_float,
                flag=None,
                no_flag=TUNING,
            )
        },
    )
    metrics_addr: str | None = field(
        default=None,
        metadata={
            SETTING: Spec(
                help="Serve Prometheus metrics on HOST:PORT during the run (e.g. 127.0.0.1:9464; :9464 for every "
                "interface); off by default.",
                example="127.0.0.1:9464",
                parse=_host_port,
                text=True,
                flag=Flag(metavar="HOST:PORT"),
                fix="give HOST:PORT (127.0.0.1:9464, [::1]:9464), or :PORT for every interface (:9464)",
            )
        },
    )
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
        """The PostgreSQL ledger's URL (never with a password) when --ledger names one, else None."""
        return self.ledger if isinstance(self.ledger, str) else None

    def ledger_path(self) -> Path:
        """The ledger: the one named, else one per partner and endpoint in the user's data folder.

        Not in the current folder: the same command run from anywhere must find the same ledger, or a re-run
        from elsewhere would start afresh and send every enrolled user again.
        """
        if isinstance(self.ledger, str):
            raise ValueError("the ledger is a PostgreSQL database, not a file: see ledger_url")
        if self.ledger is not None:
            return Path(os.path.abspath(self.ledger))
        parts = urlsplit(self.base_url)
        host = f"{parts.hostname or 'nohost'}_{_port(parts)}"
        name = _SAFE.sub("_", f"{self.partner_id or 'nopartner'}@{host}")
        return self.ledger_folder / f"{name}.sqlite"

    @property
    def ledger_folder(self) -> Path:
        """Where the default ledgers live, one per partner and endpoint: `backfill ledgers` lists them."""
        return self.data_dir / "ledgers"

    def ledger_location(self) -> str | None:
        """The ledger a run with these settings uses, as text: the URL, the file named, or the default one; None
        when the default one has nothing to be derived from (no partner ID), where a path would be a guess."""
        if self.ledger_url is not None:
            return self.ledger_url
        if self.ledger is None and not self.partner_id:
            return None
        return str(self.ledger_path())

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values with secrets masked, for summaries and `config show`."""
        out: dict[str, Any] = {}
        for key, spec in SPECS.items():
            value = getattr(self, key)
            if spec.secret:
                value = "***" if value else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[key] = value
        return out


# Every setting's spec, by key, in the order of the fields (the order of `config show` and of the docs' table).
SPECS: Mapping[str, Spec] = MappingProxyType(
    {f.name: replace(f.metadata[SETTING], key=f.name) for f in fields(Settings) if SETTING in f.metadata}
)
# Each name a setting is read under, its key and its old names: the YAML's keys and the flags' destinations.
_BY_NAME: Mapping[str, Spec] = {name: s for s in SPECS.values() for name in (s.key, *s.aliases)}
_BY_VARIABLE: Mapping[str, Spec] = {var: s for s in SPECS.values() for var in s.variables}
# Read by load_settings itself: columns merge role by role; the API key is checked without ever being shown.
_READ_APART = frozenset({"columns", "api_key"})
# Keys only the YAML (and a Python caller, who sets the file's keys) may set; `api_key` is named so the error can
# say why it is refused.
_YAML_ONLY = {"api_key_file"}
_CREDENTIALS = frozenset({"partner_id", "api_key", "api_key_file"})
# (problem, fix) for the key itself given as a key of the file, or as a Python caller's keyword.
_KEY_IN_FILE = ("the API key must never be stored in the config file", SPECS["api_key"].fix)
_KEY_AS_ARGUMENT = (
    "the API key is never an argument: an orchestrator shows a task's arguments in its UI and logs",
    "export SMILE_API_KEY (or put it in the environment mapping given with the settings), or name a file "
    "holding it with api_key_file=",
)


_SAFE = re.compile(r"[^A-Za-z0-9@._-]")


def _port(parts: Any) -> int:
    return int(parts.port or (443 if parts.scheme == "https" else 80))


def endpoint_of(base_url: str) -> str:
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{_port(parts)}"


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    need_credentials: bool = True,
    defer_credentials: bool = False,
    arguments: Mapping[str, object] | None = None,
) -> Settings:
    """Resolve settings from every layer; the first problem raises ConfigError naming key, source, fix.

    `flags` is the top layer, by setting key (or old name): the CLI's option values, None where not given.
    `arguments`, above even that: a Python caller's keywords, by the config file's keys (`ARGUMENT` is their
    source), read as the file's values are, but for the YAML's own typing (a number for text is simply wrong).
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

    def put(spec: Spec, said: str, raw: object, source: str) -> None:
        """`raw` for `spec`, given as `said` (its key or an old name, as the error names it) from `source`."""
        try:
            values[spec.key] = spec.read(raw)
        except ValueError as exc:
            refuse(ConfigError(said, source, str(exc), spec.fix or f"correct {said} in {source}"))
            values.pop(spec.key, None)  # an earlier layer's value is not the one meant: leave it unset
        sources[spec.key] = source

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

    def put_keys(
        data: Mapping[str, object], where: str, written: Mapping[str, str] | None, base: Path
    ) -> None:
        """The config file's keys (or a Python caller's), from `where`; `written`: the YAML's scalars as typed
        (None: not YAML); `base`: the folder a relative `api_key_file` is in."""
        for spec in SPECS.values():
            _refuse_both_names(spec, [(k, data[k], where) for k in (*spec.aliases, spec.key) if k in data])
        for key, raw in data.items():
            named = _BY_NAME.get(key)
            if key == "api_key":
                refuse(
                    ConfigError(
                        "api_key", where, *(_KEY_IN_FILE if written is not None else _KEY_AS_ARGUMENT)
                    )
                )
                continue
            if (named is None or not named.in_file) and key not in _YAML_ONLY:
                known = sorted(s.key for s in SPECS.values() if s.in_file)
                close = difflib.get_close_matches(str(key), [*known, *_YAML_ONLY], n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
                raise ConfigError(str(key), where, "unknown key", f"remove it or fix its name ({hint})")
            if (
                written is not None
                and named is not None
                and named.text
                and isinstance(raw, bool | int | float | date)
            ):
                refuse(_not_text(key, raw, written.get(key), where))
                continue
            if named is None:  # api_key_file
                key_from(functools.partial(_read_key_file, raw, base, where), f"{where} (api_key_file)")
            elif named.key == "columns":
                put_columns(raw, where, written or {})
            else:
                put(named, key, raw, where)

    if config_file is not None:
        data, written = _read_yaml(config_file)
        put_keys(data, f"config file {config_file}", written, config_file.parent)

    for spec in SPECS.values():
        given = [(var, environ[var], f"environment {var}") for var in spec.variables if var in environ]
        _refuse_both_names(spec, given)
        for var, raw, source in given:
            if spec.key == "columns":
                put_columns(raw, source, {})
            elif spec.key == "api_key":
                if raw:  # set but empty, as `export SMILE_API_KEY=` leaves it: not given
                    key_from(functools.partial(_api_key, raw, source), source)
            else:
                old = var.removeprefix(ENV_PREFIX).lower()
                put(spec, old if old in spec.aliases else spec.key, raw, source)
    if "ca_bundle" not in values and environ.get("SSL_CERT_FILE", "").strip():
        # The machine's own choice, as OpenSSL, curl and Python read it; any source of the setting wins over it.
        put(SPECS["ca_bundle"], "ca_bundle", environ["SSL_CERT_FILE"], "environment SSL_CERT_FILE")
    warnings = environment_warnings(environ)
    if "data_dir" not in values:
        values["data_dir"] = _data_dir(environ)
        sources["data_dir"] = (
            "XDG_DATA_HOME"
            if os.path.isabs(environ.get("XDG_DATA_HOME") or "")
            else "default (~/.local/share)"
        )

    flags = flags or {}
    if unknown := sorted(set(flags) - set(_BY_NAME)):
        raise TypeError(f"not settings: {', '.join(unknown)}")
    for spec in SPECS.values():
        names = [name for name in (*spec.aliases, spec.key) if flags.get(name) is not None]
        _refuse_both_names(
            spec, [(_flag_name(spec, n), flags[n], f"flag {_flag_name(spec, n)}") for n in names]
        )
        for name in names:
            source = f"flag {_flag_name(spec, name)}"
            if spec.key == "columns":
                if flags[name]:  # --column, repeatable: a tuple of ROLE=NAME
                    put_columns(flags[name], source, {})
            else:
                put(spec, name, flags[name], source)
    if arguments:
        put_keys(arguments, ARGUMENT, None, Path.cwd())

    if "ledger" not in values:
        # Said where the path comes from: a user who sees it change with the partner or the URL knows why.
        sources["ledger"] = (
            DERIVED_LEDGER if values.get("partner_id") else f"{DERIVED_LEDGER}: no partner ID is set"
        )
    if "base_url" not in values:
        env = values.get("env", Settings.env)
        values["base_url"] = ENVIRONMENTS[env]
        sources["base_url"] = f"env={env}"  # read after "from" in every message: "(from env=local)"
    values["columns"] = _distinct(columns, column_sources)
    sources["columns"] = _columns_source(column_sources)
    values["api_key"] = api_key or Secret("")
    for key in SPECS:
        sources.setdefault(key, "default")
    settings = Settings(**values, sources=sources, warnings=warnings, credential_problems=tuple(deferred))
    _check_whole(settings, need_credentials)
    return settings


def flag_for(name: str) -> str:
    """The flag that `name`, a key of load_settings' `flags` (a setting's key or old name), stands for."""
    return _flag_name(_BY_NAME[name], name)


def _flag_name(spec: Spec, name: str) -> str:
    """The flag a setting was given with: its own, or its old name's."""
    return spec.flag_name if name == spec.key else spec.old_flags[spec.aliases.index(name)]


def _refuse_both_names(spec: Spec, given: Sequence[tuple[str, object, str]]) -> None:
    """One layer gave a setting under its name and an old one, with different values: which was meant can't be
    known. `given`: each name as written (key, variable or flag), old names first, with its value and source."""
    if spec.aliases and len({repr(raw) for _, raw, _ in given}) > 1:
        names = [name for name, _, _ in given]
        sources = " and ".join(dict.fromkeys(source for _, _, source in given))
        problem = f"{' and '.join(names)} are one setting ({', '.join(names[:-1])}: its old name)"
        raise ConfigError(spec.key, sources, f"{problem}, given different values", f"give {names[-1]} alone")


def early_log_format(config_file: Path | None, environ: Mapping[str, str], flag: str | None) -> str:
    """The log format as far as it is known before the settings are whole, for the lines that say why they aren't
    (a config error, a warning): --log-format, else BACKFILL_LOG_FORMAT, else the config file's log_format, the
    first of them that names a format; else text. Never raises: a bad value is the settings' error to tell."""
    spec = SPECS["log_format"]
    given: list[object] = [flag, *(environ.get(var) for var in reversed(spec.variables))]
    if config_file is not None:
        # A file that can't be read is the settings' error to tell, in the format known without it.
        with contextlib.suppress(ConfigError):
            given.append(_read_yaml(config_file)[0].get(spec.key))
    for raw in given:
        try:
            return str(spec.read(raw))
        except ValueError:
            continue  # not given, or not a format: the next source down may name one
    return Settings.log_format


# BACKFILL_* variables that are not settings but are read elsewhere: never warned about.
# BACKFILL_TEST_CRASH_AT: the crash suite's test mode (`backfill.run.crash.CRASH_ENV`).
KNOWN_NON_SETTINGS = frozenset({"BACKFILL_TEST_CRASH_AT"})


def environment_warnings(environ: Mapping[str, str]) -> tuple[str, ...]:
    """One line per BACKFILL_* variable that is not a setting (a typo is ignored, so it must be said)."""
    return tuple(_unknown_variable(name) for name in sorted(environ) if _looks_unknown(name))


def _looks_unknown(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX) and name not in KNOWN_NON_SETTINGS and name not in _BY_VARIABLE


def _unknown_variable(name: str) -> str:
    """Why the environment variable `name` (BACKFILL_-prefixed, not a setting) was ignored, and the likely fix."""
    key = name[len(ENV_PREFIX) :].lower()
    said = f"environment {name} is not a setting and was ignored"
    if name.upper() in _BY_VARIABLE:
        return f"{said} (did you mean {name.upper()}? names are case-sensitive)"
    spec = SPECS.get(key)
    if spec is not None:  # a setting, but not read from BACKFILL_<KEY>
        return f"{said}: {key} is read from {' or '.join(spec.variables)} only"
    if key in _YAML_ONLY:
        return f"{said}: {key} can only be set in the config file (--config)"
    current = [s.key for s in SPECS.values() if f"{ENV_PREFIX}{s.key.upper()}" in s.variables]
    close = difflib.get_close_matches(key, current, n=1)
    return f"{said} (did you mean {ENV_PREFIX}{close[0].upper()}?)" if close else said


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
                "partner_id", s.sources["partner_id"], "no partner ID is set", SPECS["partner_id"].fix + dry
            )
        if not s.api_key:
            raise ConfigError(
                "api_key", s.sources["api_key"], "no API key is set", SPECS["api_key"].fix + dry
            )
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
                "base_url",
                s.sources["base_url"],
                f"{s.base_url} is Smile ID's {other} API, but env is {s.env} (from {s.sources['env']})",
                f"make them agree: set env to {other}, or remove base_url so env {s.env}'s documented URL is used",
            )


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
            "0x makes it hexadecimal"
            if digits.startswith("0x")
            else "0b makes it binary"
            if digits.startswith("0b")
            else "YAML 1.1 reads a:b as base 60"
            if ":" in digits
            else "a leading 0 makes it octal"
            if re.fullmatch(r"0[0-7_]+", digits)
            else "YAML drops the _ in a number"
            if "_" in digits
            else ""
        )
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
                "columns",
                where,
                f"{str(role)!r} is not a column role{guess}",
                f"use only {', '.join(COLUMN_KEYS)}, e.g. {example}",
            )
        if isinstance(name, bool | int | float | date):
            raise _not_text(f"columns.{role}", name, written.get(f"columns.{role}"), where)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(
                f"columns.{role}",
                where,
                f"{name!r} is not a column name",
                f"give the manifest header's name for {role}, e.g. {example}",
            )
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
                "columns",
                where,
                f"{a} and {b} both map to the column {columns[a]!r}",
                "map each role to its own column",
            )
    return columns


def _columns_source(role_sources: Mapping[str, str]) -> str:
    """Where the column mapping came from: one source, or each mapped role's own when the layers differ."""
    given = set(role_sources.values())
    if len(given) <= 1:
        return next(iter(given), "default")
    return "; ".join(f"{role} from {role_sources[role]}" for role in COLUMN_KEYS if role in role_sources)


def _read_key_file(raw: object, base: Path, where: str) -> Secret:
    """The key in the file `raw` names; a relative path is in `base` (the config file's folder)."""
    if isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError("api_key_file", where, "must be a path", "give the path of a file holding the key")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = base / path
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
            "api_key",
            source,
            f"the key contains a character that can't be in an API key ({what})",
            "copy the key again from the Smile ID portal, as printable text on one line",
        )
    if len(key) > 4096:
        raise ConfigError(
            "api_key",
            source,
            f"the key is {len(key):,} characters long, not an API key (is it a file's contents?)",
            "copy the key alone from the Smile ID portal",
        )
    return secret


def _data_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_DATA_HOME/backfill, else ~/.local/share/backfill. A relative XDG_DATA_HOME is ignored, as the XDG
    spec says: it would put the ledger under whatever folder the command ran from."""
    xdg = environ.get("XDG_DATA_HOME") or ""
    home = environ.get("HOME") or os.path.expanduser("~")
    base = xdg if os.path.isabs(xdg) else os.path.join(home, ".local", "share")
    return Path(base) / "backfill"
