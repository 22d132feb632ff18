"""A local emulator of Smile ID's POST /v1/backfill_users with injectable faults, for tests and rehearsals."""

from __future__ import annotations

from .app import REQUIRED_FIELDS, make_app
from .options import (
    NO_FAULTS,
    SCRIPT_FAULTS,
    Faults,
    OptionKeywords,
    SandboxOptions,
    foreign_draw,
    read_foreign_ids,
)
from .server import RunningSandbox, serve, start_sandbox
from .state import STATE_KEY, EnrolledUser, SandboxState, sandbox_state

__all__ = [
    "NO_FAULTS",
    "REQUIRED_FIELDS",
    "SCRIPT_FAULTS",
    "STATE_KEY",
    "EnrolledUser",
    "Faults",
    "OptionKeywords",
    "RunningSandbox",
    "SandboxOptions",
    "SandboxState",
    "foreign_draw",
    "make_app",
    "read_foreign_ids",
    "sandbox_state",
    "serve",
    "start_sandbox",
]
