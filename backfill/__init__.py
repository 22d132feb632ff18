"""backfill: enroll a partner's existing users into Smile ID, resumably and exactly once per user_id.

From Python (an orchestrator's task): `backfill.run(manifest, **settings)` or `await backfill.arun(...)`, which
return a `RunResult` and raise a `BackfillError` with the CLI's exit code (README.md, "Python API").
`backfill.run` is that function, not the `backfill/run/` package of the engine, which is imported by its dotted
name (`from backfill.run import engine`) as before.
"""

from .errors import BackfillError, ConfigError, LedgerLocked
from .python_api import RunResult, SystemicStop, arun, run
from .version import __version__
from .vocab import ExitCode

__all__ = [
    "BackfillError",
    "ConfigError",
    "ExitCode",
    "LedgerLocked",
    "RunResult",
    "SystemicStop",
    "__version__",
    "arun",
    "run",
]
