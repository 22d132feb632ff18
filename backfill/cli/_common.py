"""What every command shares: the error guard that maps library errors to exit codes, and common options."""

from __future__ import annotations

import logging
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
from ..config import Settings, Spec, Takes
from ..errors import BackfillError, ConfigError
from ..vocab import EXIT_FIXES, ExitCode
from .logs import Said, say, start

# The local sandbox's credentials when none are given: public values for an emulator, not secrets.
LOCAL_PARTNER_ID = "000"
LOCAL_API_KEY = "local-sandbox-key"

F = TypeVar("F", bound=Callable[..., Any])


def fail(error: BackfillError) -> NoReturn:
    """The error's one line (with its exit code and fix, as JSON) and its exit code."""
    named = (
        {"setting": error.key, "source": error.source, "problem": error.problem}
        if isinstance(error, ConfigError)
        else {}
    )
    say(
        logging.ERROR,
        Said.FATAL_ERROR,
        f"backfill: {error}",
        message=str(error),
        exit_code=error.exit_code,
        error=type(error).__name__,
        fix=error.fix or EXIT_FIXES[error.exit_code],
        **named,
    )
    sys.exit(error.exit_code)


def guard(fn: F) -> F:
    """Turn the library's errors into a one-line message and the error's exit code: no traceback.

    Each line is in the log format as far as it is known from the command's flags, the environment and its
    config file before the settings are read (config.early_log_format), so an error in them is told in it too.
    """

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start(config.early_log_format(kwargs.get("config_file"), os.environ, kwargs.get("log_format")))
        try:
            return fn(*args, **kwargs)
        except BackfillError as error:
            fail(error)
        except KeyboardInterrupt:
            say(
                logging.WARNING,
                Said.INTERRUPTED,
                "backfill: interrupted",
                message="interrupted",
                exit_code=ExitCode.SIGINT,
            )
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
    said = f"internal error: {error!r}. Please report it; re-run to resume"
    say(
        logging.ERROR,
        Said.FATAL_ERROR,
        f"backfill: {said}",
        message=said,
        exit_code=ExitCode.INTERNAL,
        error=type(error).__name__,
        fix=EXIT_FIXES[ExitCode.INTERNAL],
    )
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
        settings = config.load_settings(
            config_file,
            environ,
            flags,
            need_credentials=need_credentials,
            defer_credentials=defer_credentials,
        )
    except ConfigError:
        _warn(config.environment_warnings(os.environ if environ is None else environ))
        raise
    _warn(settings.warnings)
    return settings


def _warn(warnings: Iterable[str]) -> None:
    for warning in warnings:
        say(logging.WARNING, Said.SETTINGS_WARNING, f"backfill: warning: {warning}", message=warning)


class SettingOption(click.Option):
    """An option made from a setting's Spec (config.SPECS): its value reaches load_settings as a flag."""


def setting_options(*keys: str, help: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """The options of these settings, in this order in --help, each made from its Spec; `help` words one
    differently for a command where it does something else (picking the ledger a command reads)."""

    def add(fn: F) -> F:
        for key in reversed(keys):
            for option in reversed(_options(config.SPECS[key], (help or {}).get(key))):
                fn = option(fn)
        return fn

    return add


def _options(spec: Spec, help: str | None) -> list[Callable[[F], F]]:
    """The option that sets `spec`'s setting, with one hidden option per old name (which load_settings reads
    as the same setting, and names in its messages as it was written)."""
    flag = spec.flag
    if flag is None:
        raise ValueError(f"{spec.key} has no flag: {spec.no_flag}")
    kinds: dict[str, Any] = {"metavar": flag.metavar}
    if spec.choices:
        kinds["type"] = click.Choice(spec.choices)
    if flag.takes is Takes.SWITCH:
        kinds |= {"is_flag": True, "flag_value": flag.value, "default": None}  # None: not given, so not set
    elif flag.takes is Takes.REPEATED:
        kinds |= {"multiple": True, "callback": _none_if_empty}
    elif flag.takes is Takes.FILE:
        kinds["type"] = click.Path(path_type=Path, dir_okay=False)
    elif flag.takes is Takes.FOLDER:
        kinds["type"] = click.Path(path_type=Path, file_okay=False)
    said = help or flag.help or spec.help
    if spec.aliases:
        said += f" Its old name, {', '.join(spec.old_flags)}, works too."
    shown = _default_shown(spec)
    options = [
        click.option(spec.flag_name, spec.key, cls=SettingOption, help=said, show_default=shown, **kinds)
    ]
    for alias, name in zip(spec.aliases, spec.old_flags, strict=True):
        options.append(click.option(name, alias, cls=SettingOption, hidden=True, **kinds))
    return options


def _default_shown(spec: Spec) -> str | None:
    """A setting's built-in default, for --help: the flags default to None, so YAML and BACKFILL_* still apply."""
    assert spec.flag is not None
    if spec.flag.default_shown is not None:
        return spec.flag.default_shown or None
    if spec.flag.takes in (Takes.SWITCH, Takes.REPEATED):
        return None
    default = next(f.default for f in fields(Settings) if f.name == spec.key)
    return None if default is None else str(default)


def _none_if_empty(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...] | None:
    # A repeatable flag left out is (), not None: None is what lets YAML and BACKFILL_* through.
    return value or None


config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="YAML settings file."
)
out_option = setting_options("out")
log_options = setting_options("log_format", "log_file", "log_level", "log_user_ids")
# How a command that reads a manifest reads it, as `run` does.
manifest_options = setting_options("delimiter", "encoding", "manifest_format", "columns", "normalize")


def ledger_options(ledger_help: str | None = None) -> Callable[[F], F]:
    """--ledger, --env and --base-url: how a command that only reads finds the ledger `run` would use."""
    reading = {
        "env": "Picks the default ledger.",
        "base_url": "API root: with the partner ID, picks the default ledger.",
    }
    return setting_options(
        "ledger", "env", "base_url", help=reading | ({"ledger": ledger_help} if ledger_help else {})
    )
