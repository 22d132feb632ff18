"""What every command shares: the error guard that maps library errors to exit codes, and common options."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ..errors import BackfillError
from ..vocab import ExitCode

# The local sandbox's credentials when none are given: public values for an emulator, not secrets.
LOCAL_PARTNER_ID = "000"
LOCAL_API_KEY = "local-sandbox-key"

F = TypeVar("F", bound=Callable[..., Any])


def fail(error: BackfillError) -> NoReturn:
    click.echo(f"backfill: {error}", err=True)
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

    return wrapper  # type: ignore[return-value]


config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), help="YAML settings file."
)
out_option = click.option("--out", type=click.Path(path_type=Path, file_okay=False), help="Output folder.")


def log_options(fn: F) -> F:
    fn = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))(fn)
    fn = click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False),
                      help="Also log every event here (appended).")(fn)  # fmt: skip
    return click.option(
        "--log-format", type=click.Choice(["text", "json"]), help="json: one object per line."
    )(fn)
