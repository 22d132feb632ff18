"""The one exception tree: every error the library raises is a BackfillError carrying its exit code.

    BackfillError (exit 1)
    ├── ConfigError (2)          a setting: names the key, where its value came from, and the fix
    ├── ManifestError (2)        the manifest as a whole can't be read
    ├── OutputError (2)          the output folder or a file in it
    ├── LedgerError (2)          the ledger can't be opened or written, or belongs to another partner/endpoint
    │   ├── LedgerAbsent (2)     no ledger there yet
    │   └── LedgerLocked (3)     another live run holds it
    ├── Declined (1)             asked before sending to production, the answer wasn't yes
    ├── InternalError (70)       a bug: the run stops cleanly
    └── SystemicStop (4)         python_api.py: a library caller's run stopped early; carries its RunResult

A foreign library's exceptions (aiohttp, sqlite3, psycopg, obstore, pandas) are translated into these where that
library is called. A row's own problem is not an error: a photo that can't be read is an `images.ImageError` (and
a photo URL that can't name an object an `images.urls.BadUrl`), caught by the stage that reads it and turned into
that row's reject, so a run never stops for one row; a request with no answer is an `api.answers.NoAnswer` record,
classified like any answer. The codes themselves are `vocab.ExitCode`.
"""

from __future__ import annotations

from .vocab import ExitCode


class BackfillError(Exception):
    """Base of every error this package raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code: int = ExitCode.ROWS_LEFT
    # What to do, when this error knows better than its exit code's general advice (vocab.EXIT_FIXES).
    fix: str = ""


class ConfigError(BackfillError):
    """A setting is missing or wrong. Names the key, where its value came from, and the fix."""

    exit_code: int = ExitCode.LOCAL

    def __init__(self, key: str, source: str, problem: str, fix: str) -> None:
        self.key, self.source, self.problem, self.fix = key, source, problem, fix
        super().__init__(f"config error: {key} (from {source}): {problem}. Fix: {fix}")


class ManifestError(BackfillError):
    """The manifest as a whole can't be read (bad encoding, missing columns): no row can be trusted."""

    exit_code: int = ExitCode.LOCAL


class OutputError(BackfillError):
    """The output folder or a file in it can't be created or written."""

    exit_code: int = ExitCode.LOCAL


class LedgerError(BackfillError):
    """The ledger can't be opened or written, or isn't the one for this partner and endpoint."""

    exit_code: int = ExitCode.LOCAL


class LedgerAbsent(LedgerError):
    """The named database holds no ledger yet: a writing command creates it; a reader finds nothing."""


class LedgerLocked(LedgerError):
    """Another live run holds the ledger."""

    exit_code: int = ExitCode.LOCKED


class Declined(BackfillError):
    """Asked before sending to production, the operator didn't say yes: nothing was sent or written.

    Exit 1, not 2: nothing is wrong that needs fixing, and the rows are simply left, as with --limit.
    """

    exit_code: int = ExitCode.ROWS_LEFT


class InternalError(BackfillError):
    """A bug in this tool. The run stops cleanly (every attempt is recorded); please report it."""

    exit_code: int = ExitCode.INTERNAL
