"""Every line the CLI writes to stderr: the run's log records and its own lines, as text or JSON, and --log-file.

With `--log-format json` each one is a JSON object: the run's events (cli/../run/events.py) and the CLI's own lines
(`Said`: an error that ends the command, a warning about the settings, a signal heard, the summary), which in
text keep the plain words they always had. The format is known before the settings are whole (config.py's
`early_log_format`), so that an error in them is told in it too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from enum import StrEnum
from typing import Any

import click
from tqdm import tqdm

from ..config import Settings
from ..errors import ConfigError
from ..outputs.private import make_private_dirs
from ..redact import scrub

log = logging.getLogger("backfill")


class Key(StrEnum):
    """The keys every JSON line has, whatever its event; the event's own fields follow them."""

    TS = "ts"  # UTC, to the millisecond: 2026-11-23T09:51:58.131Z
    LEVEL = "level"  # debug, info, warning or error
    EVENT = "event"  # what happened: one of the names docs/operating.md lists
    RUN_ID = "run_id"  # the run's ID (its output folder's name) once it has one; "" before
    MESSAGE = "message"  # the line as the text format says it


class Said(StrEnum):
    """The events of the CLI's own lines, beside the run's."""

    FATAL_ERROR = "fatal_error"  # the command stops: exit_code, error, fix (config errors: setting, source)
    INTERRUPTED = "interrupted"  # Ctrl-C before a run began or after it ended: exit_code
    SETTINGS_WARNING = "settings_warning"  # something in the settings was ignored (a misspelt BACKFILL_*)
    STOP_REQUESTED = "stop_requested"  # the first SIGINT/SIGTERM: signal, in_flight
    LEFT_NOW = "left_now"  # the second one: signal, in_flight, out_dir, partial
    RUN_SUMMARY = "run_summary"  # the run's (or retry's) end: exit_code, counts, out_dir, report, fix...
    NOTHING_TO_RETRY = "nothing_to_retry"  # `retry` found no row in the states asked for: states
    LEDGER_CHOSEN = "ledger_chosen"  # the default ledger doesn't exist: the only one for this partner is read
    EXPORT_WRITTEN = "export_written"  # `export --out`: rows, path
    FORGOTTEN = (
        "forgotten"  # `forget` or `purge` ended: run_id, dry_run, forgotten, already, unknown, refused
    )


class _Terminal:
    """What this process's stderr is written in, and the run its lines belong to (the last run_id logged)."""

    format = "text"
    run_id = ""
    # Handlers this module put on the root logger (JSON only): removed again by the next start().
    root_handlers: tuple[logging.Handler, ...] = ()


_terminal = _Terminal()


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, run_id, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        run_id = getattr(record, "run_id", "")
        if run_id:
            _terminal.run_id = run_id  # lines without one (the ledger's, the CLI's) belong to this run
        document: dict[str, Any] = {
            Key.TS: self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            Key.LEVEL: record.levelname.lower(),
            Key.EVENT: getattr(record, "event", "log"),  # "log": a line with no event (another library's)
            Key.RUN_ID: run_id or _terminal.run_id,
            Key.MESSAGE: record.getMessage(),
        }
        # The event's fields never replace the keys every line has.
        document.update((k, v) for k, v in getattr(record, "fields", {}).items() if k not in document)
        return scrub(json.dumps(document, default=str, ensure_ascii=False))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z"
        return scrub(
            f"{stamp} {record.levelname.lower():7} {getattr(record, 'event', 'log'):15} {record.getMessage()}"
        )


def _formatter(fmt: str) -> logging.Formatter:
    formatter: logging.Formatter = _JsonFormatter() if fmt == "json" else _TextFormatter()
    formatter.converter = time.gmtime
    return formatter


class _TerminalFilter(logging.Filter):
    """What the terminal (stderr) shows: no line per successful row, and no status line under a bar; the CLI's
    own lines always, whatever --log-level (in text they are written apart, as they always were)."""

    def __init__(self, bar_shown: bool, level: int) -> None:
        super().__init__()
        self.bar_shown = bar_shown
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "said"):
            return _terminal.format == "json"
        if record.levelno < self.level:
            return False
        event = getattr(record, "event", "")
        if record.levelno >= logging.WARNING:
            return True
        if event in ("row_finished", "retry_scheduled"):
            return False
        return not (event == "progress" and self.bar_shown)


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never break a run
            self.handleError(record)


def start(fmt: str) -> None:
    """A command begins: its lines are in `fmt` until the settings say otherwise (setup_logging), and no handler
    of an earlier command in this process (a test's) writes them."""
    _close_handlers()
    _terminal.format, _terminal.run_id = fmt, ""


def _close_handlers() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    root = logging.getLogger()
    for handler in _terminal.root_handlers:
        root.removeHandler(handler)
    _terminal.root_handlers = ()
    logging.captureWarnings(False)


def setup_logging(settings: Settings, bar_shown: bool) -> None:
    """stderr gets run-level events and every warning; --log-file gets every event at --log-level."""
    _close_handlers()
    _terminal.format = settings.log_format
    formatter = _formatter(settings.log_format)
    level = getattr(logging, settings.log_level.upper())
    terminal: logging.Handler = _TqdmHandler() if bar_shown else logging.StreamHandler(sys.stderr)
    terminal.setFormatter(formatter)
    terminal.addFilter(_TerminalFilter(bar_shown, level))
    log.addHandler(terminal)
    if settings.log_format == "json":
        # Another library's warning (asyncio, aiohttp, Python's own) would be a plain line among the JSON ones.
        other = logging.StreamHandler(sys.stderr)
        other.setFormatter(formatter)
        other.setLevel(logging.WARNING)
        # psycopg's pool warns of every failed reconnect in an outage; the ledger says the outage itself, once
        # (ledger_unreachable), and the text format never showed the pool's lines either.
        other.addFilter(lambda record: not record.name.startswith("psycopg"))
        logging.getLogger().addHandler(other)
        _terminal.root_handlers = (other,)
        logging.captureWarnings(True)
    if settings.log_file is not None:
        try:
            make_private_dirs(settings.log_file.parent)  # missing folders, owner-only, as for every output
            fd = os.open(settings.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            source = settings.sources.get("log_file", "--log-file")
            raise ConfigError(
                "log_file",
                source,
                f"can't open {settings.log_file}: {exc.strerror}",
                "choose a writable path",
            ) from exc
        file_handler = logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8"))
        file_handler.setFormatter(formatter)
        file_handler.setLevel(level)
        log.addHandler(file_handler)
    log.setLevel(level)
    log.propagate = False


def json_lines() -> bool:
    """Whether this command's stderr is JSON lines (and its summary one of them, not text on stdout)."""
    return _terminal.format == "json"


def say(level: int, event: Said, text: str, *, message: str | None = None, **fields: object) -> None:
    """One of the CLI's own lines: `text` as the text format has always written it (on stderr), or as one JSON
    object with `message` (default: the text, trimmed) and `fields`; and to --log-file, once it is open."""
    record = logging.LogRecord(log.name, level, __file__, 0, message or text.strip(), None, None)
    run_id = fields.pop("run_id", "")
    record.__dict__.update(event=event.value, said=text, run_id=run_id, fields=fields)
    if not json_lines():
        click.echo(scrub(text), err=True)
    if log.handlers:
        log.handle(record)  # the terminal's filter lets it through in JSON only: in text it is written above
    elif json_lines():
        click.echo(_formatter("json").format(record), err=True)
