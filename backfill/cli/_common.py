"""What every command shares: the error guard that maps library errors to exit codes, and common options."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .. import config
from ..config import Settings
from ..errors import BackfillError, ConfigError
from ..redact import scrub
from ..vocab import ExitCode

# The local sandbox's credentials when none are given: public values for an emulator, not secrets.
LOCAL_PARTNER_ID = "000"
LOCAL_API_KEY = "local-sandbox-key"

F = TypeVar("F", bound=Callable[..., Any])


def fail(error: BackfillError) -> NoReturn:
    click.echo(scrub(f"backfill: {error}"), err=True)
    sys.exit(error.exit_code)


def guard(fn: F) -> F:
    """Turn the library's errors into a one-line message and the error's exit code: no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackfillError as error:
            fail(error)
        except KeyboardInterrupt:
            click.echo("backfill: interrupted", err=True)
            sys.exit(ExitCode.SIGINT)
        except BrokenPipeError as error:
            if not _stdout_gone():
                _internal(error)  # some other pipe or socket: a bug, not a reader that left
        # Here once the error (and the frames it holds, an open ledger's among them) is gone. The reader of our
        # output went away (`backfill export | head`): stop quietly, as `cat` or `grep` do when SIGPIPE ends
        # them (a shell reports 141 for them too). Nothing was wrong with what was written.
        except Exception as error:
            _internal(error)
        _silence_stdout()
        sys.exit(ExitCode.SIGPIPE)

    return wrapper  # type: ignore[return-value]


def _internal(error: BaseException) -> NoReturn:
    """A bug: one line saying so and exit 70, not Python's traceback and 1 (which reads as "rows left")."""
    click.echo(scrub(f"backfill: internal error: {error!r}. Please report it; re-run to resume"), err=True)
    sys.exit(ExitCode.INTERNAL)


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (a pipe whose read end is closed polls as an error)."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return True  # no descriptor to ask (a test's runner): the error is the only word there is
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is still buffered can't fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real descriptor behind stdout (a test's runner): nothing to flush
        pass


def load_settings(
    config_file: Path | None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
    *,
    need_credentials: bool = True,
    defer_credentials: bool = False,
) -> Settings:
    """`config.load_settings`, with its warnings (an unknown BACKFILL_* variable) on stderr, error or not."""
    try:
        settings = config.load_settings(config_file, environ, flags, need_credentials=need_credentials,
                                        defer_credentials=defer_credentials)  # fmt: skip
    except ConfigError:
        _warn(config.environment_warnings(os.environ if environ is None else environ))
        raise
    _warn(settings.warnings)
    return settings


def _warn(warnings: Iterable[str]) -> None:
    for warning in warnings:
        click.echo(f"backfill: warning: {warning}", err=True)


def shown(key: str) -> str:
    """A setting's built-in default, for --help: the flags default to None, so YAML and BACKFILL_* still apply."""
    value = next(f.default for f in fields(Settings) if f.name == key)
    return str(value)


config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="YAML settings file."
)
out_option = click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Output folder.",
                          show_default=shown("out"))  # fmt: skip


def log_options(fn: F) -> F:
    fn = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
                      show_default=shown("log_level"))(fn)  # fmt: skip
    fn = click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False),
                      help="Also log every event here (appended).")(fn)  # fmt: skip
    return click.option(
        "--log-format", type=click.Choice(["text", "json"]), help="json: one object per line.",
        show_default=shown("log_format"),
    )(fn)  # fmt: skip


def _none_if_empty(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...] | None:
    # A repeatable flag left out is (), not None: None is what lets YAML and BACKFILL_* through.
    return value or None


def manifest_options(fn: F) -> F:
    """--delimiter, --encoding and --column: how a command that reads a manifest reads it, like `run` does."""
    fn = click.option(
        "--column", "columns", multiple=True, metavar="ROLE=NAME", callback=_none_if_empty,
        help="The manifest's column for user_id, user_created_at or image_path, e.g. user_id=customer_ref "
             "(repeat it for each one renamed).",
    )(fn)  # fmt: skip
    fn = click.option("--encoding", metavar="NAME", help="The manifest's text encoding, e.g. cp1252 or utf-16.",
                      show_default=shown("encoding"))(fn)  # fmt: skip
    return click.option(
        "--delimiter", metavar="CHAR", help="The manifest's one character between values, e.g. ';', '|' or tab.",
        show_default=shown("delimiter"),
    )(fn)  # fmt: skip


def ledger_options(
    checkpoint_help: str = "The ledger, a file or a postgresql:// URL (default: one per partner and endpoint).",
) -> Callable[[F], F]:
    """--checkpoint, --env and --base-url: how a command that only reads finds the ledger `run` would use."""

    def add(fn: F) -> F:
        fn = click.option("--base-url", help="API root: with the partner ID, picks the default ledger.")(fn)
        fn = click.option("--env", type=click.Choice(["local", "sandbox", "production"]),
                          help="Picks the default ledger.")(fn)  # fmt: skip
        return click.option("--checkpoint", metavar="PATH|URL", help=checkpoint_help)(fn)

    return add
