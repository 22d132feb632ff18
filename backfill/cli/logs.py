"""Where the run's log records go: the terminal (above the progress bar) and --log-file, as text or JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from ..config import Settings
from ..errors import ConfigError
from ..outputs.private import make_private_dirs
from ..redact import scrub


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, run_id, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "run_id": getattr(record, "run_id", ""),
            "message": record.getMessage(),
        }
        document.update(getattr(record, "fields", {}))
        return scrub(json.dumps(document, default=str, ensure_ascii=False))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + "Z"
        return scrub(
            f"{stamp} {record.levelname.lower():7} {getattr(record, 'event', 'log'):15} {record.getMessage()}"
        )


class _TerminalFilter(logging.Filter):
    """What the terminal (stderr) shows: no line per successful row, and no status line under a bar."""

    def __init__(self, bar_shown: bool) -> None:
        super().__init__()
        self.bar_shown = bar_shown

    def filter(self, record: logging.LogRecord) -> bool:
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


def setup_logging(settings: Settings, bar_shown: bool) -> None:
    """stderr gets run-level events and every warning; --log-file gets every event at --log-level."""
    logger = logging.getLogger("backfill")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter: logging.Formatter = _JsonFormatter() if settings.log_format == "json" else _TextFormatter()
    formatter.converter = time.gmtime
    level = getattr(logging, settings.log_level.upper())
    terminal: logging.Handler = _TqdmHandler() if bar_shown else logging.StreamHandler(sys.stderr)
    terminal.setFormatter(formatter)
    terminal.addFilter(_TerminalFilter(bar_shown))
    terminal.setLevel(level)
    logger.addHandler(terminal)
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
        logger.addHandler(file_handler)
    logger.setLevel(level)
    logger.propagate = False
