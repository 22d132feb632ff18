"""The Python API: `run` and `arun` for an orchestrator's code, as thin over compose.py as the CLI is.

    result = backfill.run("users.csv", env="sandbox", rate=20)   # or: await backfill.arun(...)

Settings are the config file's keys, read by the same machinery as every other layer (their source is
`config.ARGUMENT`), above the environment and an optional config file; the credentials come from the environment
as for the CLI. A call never prints, never exits the process and installs no signal handler unless asked. What
the CLI exits 2, 3 or 4 with is raised as the project's exception carrying that exit code; any other outcome is a
`RunResult`. Cancelling the task stops the run as a first signal does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import compose
from .config import ARGUMENT, Settings, load_settings
from .errors import BackfillError, ConfigError
from .vocab import ExitCode

if TYPE_CHECKING:
    from .run.engine import Engine
    from .run.records import Summary

log = logging.getLogger("backfill")

# The config file's keys that only the CLI's terminal acts on: a Python caller's logging decides where events go.
_LOGGING_FIX = (
    "leave it out, and configure the `backfill` logger (logging.getLogger('backfill')) as the rest of your "
    "program's logging: each record carries `event`, `run_id` and `fields`"
)
TERMINAL_ONLY: Mapping[str, tuple[str, str]] = {
    "progress": ("the Python API shows no progress bar", "leave it out"),
    "log_format": ("the Python API never writes log lines itself", _LOGGING_FIX),
    "log_file": ("the Python API never writes log lines itself", _LOGGING_FIX),
    "log_level": ("the Python API never writes log lines itself", _LOGGING_FIX),
}
# The stop reason of a run whose task was cancelled: summary.json and the ledger's runs table say it, with the exit
# code 143 of a SIGTERM, which is what a cancellation usually passes on (an orchestrator stopping a task).
CANCELLED = "cancelled by its caller; every attempt is recorded, run again to resume"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """What one run did, for the code that called it."""

    exit_code: int  # what `backfill run` would exit with: 0, 1 (rows rejected or left), 130/143 (a signal)
    counts: dict[str, int]  # status → rows, as summary.json has them
    run_dir: Path  # results.csv, rejects.csv, summary.json and report.html
    summary: dict[str, Any]  # summary.json, as written
    run_id: str
    ledger: str  # where every attempt is recorded: a re-run with the same settings resumes from it
    stop_reason: str  # why the run ended before every row was done ("" when it didn't)
    warnings: tuple[str, ...]  # what was ignored but looks meant (an unknown BACKFILL_* variable)


class SystemicStop(BackfillError):
    """The run stopped early on an answer every row would get alike (a bad key, the wrong environment, the API
    gone) or on the failure breaker: `backfill run` exits 4. Its outputs are written: `result` has them."""

    exit_code: int = ExitCode.SYSTEMIC

    def __init__(self, result: RunResult) -> None:
        self.result = result
        super().__init__(
            f"stopped early: {result.stop_reason}. The outputs are in {result.run_dir}; once that is fixed, a run "
            "with the same settings resumes"
        )


def run(
    manifest: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
    **settings: object,
) -> RunResult:
    """One backfill of `manifest` (a path, or an s3://, gs://, az:// or https:// URL), in an event loop of its
    own; see `arun`.

    An exception that interrupts the call (Ctrl-C's KeyboardInterrupt, or what a host's own SIGTERM handler
    raises, as Airflow's and Dagster's do) stops the run as a cancellation does, and then goes on.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass  # none: this call makes its own
    else:
        raise RuntimeError(
            "backfill.run() can't start a loop inside a running event loop: await backfill.arun()"
        )
    main: asyncio.Task[RunResult] | None = None

    async def go() -> RunResult:
        nonlocal main
        main = asyncio.current_task()
        return await arun(manifest, config=config, environ=environ, handle_signals=handle_signals, **settings)

    # asyncio.Runner, as asyncio.run: a first Ctrl-C cancels the run's task (a stop, not an exception mid-step).
    with asyncio.Runner() as runner:
        try:
            return runner.run(go())
        except BaseException:
            # Only the run's task is cancelled, and waited for: closing the runner would cancel every task of the
            # loop at once, the engine's own among them, which is a crash, not a stop.
            if main is not None and not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    runner.get_loop().run_until_complete(main)
            raise


async def arun(
    manifest: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    handle_signals: bool = False,
    **settings: object,
) -> RunResult:
    """One backfill of `manifest` in the running event loop, with every guarantee of `backfill run`.

    `settings`: the config file's keys (`rate=20`, `ledger="postgresql://..."`, `columns={"user_id": "ref"}`),
    over the YAML file `config` and the environment (`BACKFILL_*`). `environ`: the environment to read instead of
    os.environ, credentials included (SMILE_PARTNER_ID, SMILE_API_KEY). `handle_signals`: SIGINT and SIGTERM stop
    the run as they stop the CLI's, until it ends (main thread only; a second signal ends the process at once).

    Raises ConfigError, ManifestError, OutputError or LedgerError (exit_code 2), LedgerLocked (3), SystemicStop
    (4, with the run's result), InternalError (70). Cancelled, the run stops as on a first signal (no new request
    starts, those in flight are recorded, the outputs are written: summary.json's exit code is 143), and then
    CancelledError is raised again; cancelled again while it stops, the stop goes on. Cancel this task, not the
    whole loop: the engine's own tasks are not to be cancelled from outside.
    """
    loaded = _settings(config, environ, settings)
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            "handle_signals",
            ARGUMENT,
            "signal handlers can only be installed from the main thread",
            "leave handle_signals out, and cancel the task to stop the run",
        )
    _quiet_unless_configured()
    for warning in loaded.warnings:
        log.warning(warning, extra={"event": "setting_ignored", "fields": {}})
    engines: list[Engine] = []
    undo: list[Callable[[], None]] = []
    cancelled = False

    def ready(engine: Engine) -> None:
        engines.append(engine)
        if handle_signals:
            undo.append(compose.stop_on_signals(engine))
        if cancelled:  # while the run was being set up: it stops before its first request
            engine.stop(CANCELLED, ExitCode.SIGTERM)

    work = asyncio.ensure_future(compose.run(loaded, os.fspath(manifest), engine_ready=ready))
    try:
        try:
            await asyncio.wait({work})  # a cancellation of this task lands here, and leaves `work` running
        except asyncio.CancelledError:
            cancelled = True
            if engines:
                engines[0].stop(CANCELLED, ExitCode.SIGTERM)
            await _stopped(work)
            raise
    finally:
        for step in undo:
            step()
    return _result(work.result(), loaded.warnings)


def _settings(
    config: str | os.PathLike[str] | None, environ: Mapping[str, str] | None, settings: Mapping[str, object]
) -> Settings:
    for key in settings:
        if key in TERMINAL_ONLY:
            problem, fix = TERMINAL_ONLY[key]
            raise ConfigError(key, ARGUMENT, problem, fix)
    return load_settings(Path(config) if config is not None else None, environ, arguments=settings)


_quiet = logging.NullHandler()


def _quiet_unless_configured() -> None:
    """Nothing reaches stderr unless the caller's logging sends it there: with no handler anywhere, Python's
    last resort would print the run's warnings. (From the first call on, not at import: the CLI's own commands
    keep that last resort.)"""
    if _quiet not in log.handlers:
        log.addHandler(_quiet)


async def _stopped(work: asyncio.Future[Summary]) -> None:
    """Wait for a run the caller cancelled to end its stop, as on a first signal.

    The run's task itself is never cancelled: its stop is bounded (no new request starts; those in flight are
    waited for as the engine's stop says), writes the outputs, and leaves nothing half-open (a ledger being opened
    in a thread, say). Cancelled again meanwhile, the stop goes on: a library can't leave the process at once as a
    second signal does, and cutting the run short would leave a run folder with no summary.json.
    """
    while not work.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({work})
    if not work.cancelled() and (error := work.exception()) is not None:
        # The caller asked for a stop and hears CancelledError; what went wrong while stopping is logged.
        log.warning("while stopping: %s", error, extra={"event": "stop_failed", "fields": {}})


def _result(summary: Summary, warnings: tuple[str, ...]) -> RunResult:
    # Absolute: a caller may change folders later, and the run's folder stays where it is.
    run_dir = Path(summary.out_dir).absolute()
    result = RunResult(
        exit_code=int(summary.exit_code),
        counts=dict(summary.counts),
        run_dir=run_dir,
        summary=json.loads((run_dir / "summary.json").read_text(encoding="utf-8")),
        run_id=summary.run_id,
        ledger=summary.ledger,
        stop_reason=summary.stop_reason,
        warnings=warnings,
    )
    if result.exit_code == ExitCode.SYSTEMIC:
        raise SystemicStop(result)
    return result
