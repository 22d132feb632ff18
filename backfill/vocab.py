"""The tool's vocabulary: every status, ledger state, reject reason and exit code, and the sets built from them."""

from __future__ import annotations

import difflib
from enum import IntEnum, StrEnum


class State(StrEnum):
    """Where a user_id stands in the ledger. Transitions between them live in `ledger/transitions.py`."""

    SENDING = "sending"  # an attempt is on the wire (recorded immediately before its bytes left)
    PENDING = "pending"  # known, not finished, nothing in flight
    ENROLLED = "enrolled"
    ALREADY_ENROLLED = "already_enrolled"
    ID_CONFLICT = "id_conflict"
    FAILED = "failed"
    RETRY_EXHAUSTED = "retry_exhausted"
    UNKNOWN = "unknown"


class UserIds(StrEnum):
    """How log lines and metric labels name a user (the `log_user_ids` setting)."""

    PLAIN = "plain"  # the user_id as the manifest has it
    HASHED = "hashed"  # a keyed hash under the ledger's secret: `backfill find-user ID` finds it again
    OMIT = "omit"  # not at all: for logs shipped to a third party


class Status(StrEnum):
    """A row's status in one run's outputs: the ledger's final states plus those that only a run has."""

    ENROLLED = "enrolled"
    ALREADY_ENROLLED = "already_enrolled"
    SKIPPED = "skipped"  # done in the ledger already: not sent again
    FORGOTTEN = "forgotten"  # erased from the ledger on request (`backfill forget`/`purge`): never sent again
    ID_CONFLICT = "id_conflict"
    FAILED = "failed"
    RETRY_EXHAUSTED = "retry_exhausted"
    UNKNOWN = "unknown"
    PENDING = "pending"
    DRY_RUN = "dry_run"  # would be sent
    REJECTED = "rejected"  # in rejects.csv only


class Reason(StrEnum):
    """Why a row is rejected, in the order the checks run; a row gets the first that applies."""

    MALFORMED_ROW = "malformed_row"
    EMPTY_VALUE = "empty_value"
    BAD_USER_ID = "bad_user_id"
    DUPLICATE_USER_ID = "duplicate_user_id"
    DUPLICATE_ROW = "duplicate_row"  # a later copy of a line with the same user_id, date and photo: sent once
    BAD_DATE = "bad_date"
    FUTURE_DATE = "future_date"
    PATH_OUTSIDE_ROOT = "path_outside_root"
    IMAGE_MISSING = "image_missing"
    IMAGE_NOT_FILE = "image_not_file"
    IMAGE_UNREADABLE = "image_unreadable"
    IMAGE_EMPTY = "image_empty"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_NOT_JPEG_OR_PNG = "image_not_jpeg_or_png"
    IMAGE_TRUNCATED = "image_truncated"
    IMAGE_UNDECODABLE = "image_undecodable"  # --normalize: the decoder can't read the photo (damaged, cut)
    SHARED_PHOTO = (
        "shared_photo"  # the same photo as more than max_ids_per_photo user_ids: which one is right?
    )
    USER_ID_REUSED = "user_id_reused"  # the ledger pins another photo to this ID


class Kind(StrEnum):
    """What one answer from the API means, as `api/answers.py` classifies it."""

    ENROLLED = "enrolled"  # a verified 0840
    ALREADY = "already"  # 2209: ours or someone else's, as the 2209 rule (`state_of_2209` below) decides
    PERMANENT = "permanent"  # this row would get the same answer again
    TRANSIENT = "transient"  # try again later
    UNVERIFIED = "unverified"  # looked like success but can't be trusted; the user may be enrolled
    SYSTEMIC = "systemic"  # every row would get this answer: stop the run


# The API's "already enrolled": the user_id is taken, by an attempt of ours or by someone else.
ALREADY_CODE = "2209"


def state_of_2209(*, doubt_before: bool) -> State:
    """The 2209 rule, in its one home: an "already enrolled" answer is ours (ALREADY_ENROLLED) only if a request
    of ours for the ID may have reached the server before this attempt, which the ledger's doubt says; without
    that doubt someone else holds the ID (ID_CONFLICT), for a person to look at, never a success.

    The sender reads a 2209's final status from it (`run/status.py`), and the ledger refuses any outcome that
    disagrees with the doubt it holds (`ledger/transitions.py`). The answer itself neither says this attempt may
    have enrolled the user nor proves it didn't (`api/answers.py`), so it never changes the doubt it is read by.
    """
    return State.ALREADY_ENROLLED if doubt_before else State.ID_CONFLICT


class ExitCode(IntEnum):
    OK = 0
    ROWS_LEFT = 1  # rejects, rows not done, or a planned stop with rows left
    LOCAL = 2  # usage, configuration, input, ledger or output problem
    LOCKED = 3  # another run holds the ledger
    SYSTEMIC = 4  # a systemic answer or the failure breaker
    INTERNAL = 70  # EX_SOFTWARE: a bug in this tool
    SIGINT = 130
    SIGPIPE = 141  # the reader of stdout went away (`export | head`): as a shell reports for `cat`, `grep`
    SIGTERM = 143


# What each exit code means, as the report says it (docs/operating.md's table says more: test_docs keeps the two
# listing the same codes).
EXIT_MEANINGS: dict[int, str] = {
    ExitCode.OK: "every valid row is enrolled, already enrolled, skipped or forgotten, and nothing was rejected",
    ExitCode.ROWS_LEFT: "finished with rejected rows or rows not done",
    ExitCode.LOCAL: "usage or configuration error, unreadable manifest, ledger or output folder: nothing was sent",
    ExitCode.LOCKED: "another run held the ledger",
    ExitCode.SYSTEMIC: "stopped early on a systemic API error: check the key, environment and clock",
    ExitCode.INTERNAL: "a bug in this tool stopped the run cleanly; every attempt is recorded, re-run to resume",
    ExitCode.SIGINT: "interrupted by SIGINT; every attempt is recorded, re-run to resume",
    ExitCode.SIGPIPE: "the reader of the output went away",
    ExitCode.SIGTERM: "interrupted by SIGTERM; every attempt is recorded, re-run to resume",
}

# What to do about each exit code, as docs/operating.md's table says it (test_docs keeps the two the same): the
# `fix` of a JSON log's error or summary line, when the error itself knows no better one.
EXIT_FIXES: dict[int, str] = {
    ExitCode.OK: "nothing",
    ExitCode.ROWS_LEFT: "read rejects.csv / results.csv; re-run or backfill retry",
    ExitCode.LOCAL: "fix what the message names, re-run",
    ExitCode.LOCKED: "wait for the other run, or stop it; a lock left by a dead process is taken over automatically",
    ExitCode.SYSTEMIC: "check the key, environment and clock, the URL, network, proxy and CA bundle (backfill check), "
    "or the images and the API's status; re-run",
    ExitCode.INTERNAL: "re-run to resume, and please report it with the message",
    ExitCode.SIGINT: "re-run to resume",
    ExitCode.SIGPIPE: "nothing; with set -o pipefail, expect it from a pipe cut short",
    ExitCode.SIGTERM: "re-run to resume",
}


# A ledger row in one of these is never sent again, whatever the manifest says.
DONE_STATES = frozenset({State.ENROLLED, State.ALREADY_ENROLLED})
# States a terminal write can never leave (the ledger refuses any write over them).
TERMINAL_STATES = frozenset({State.ENROLLED, State.ALREADY_ENROLLED, State.ID_CONFLICT})
# What `backfill purge` counts as finished: nothing more will ever be sent for them without a person deciding so.
# Open rows (pending, unknown, retry_exhausted) are still work to do, and a row SENDING may be on the wire now.
FINISHED_STATES = TERMINAL_STATES | {State.FAILED}
# What `backfill retry` re-sends by default, and what it can re-send when named.
TRANSIENT_STATES = frozenset({State.PENDING, State.SENDING, State.RETRY_EXHAUSTED, State.UNKNOWN})
RETRYABLE_STATES = TRANSIENT_STATES | {State.FAILED}
# Statuses that end a row well; a run whose rows all end in these (and no rejects) exits 0.
# A forgotten ID ends well as a skipped one does: not sending it is what was asked for.
OK_STATUSES = frozenset({Status.ENROLLED, Status.ALREADY_ENROLLED, Status.SKIPPED, Status.FORGOTTEN})
# Statuses a run may end with and still be a success: a dry run's rows too.
FINE_STATUSES = OK_STATUSES | {Status.DRY_RUN}
# Statuses the failure breaker counts.
FAILURE_STATUSES = frozenset({Status.FAILED, Status.RETRY_EXHAUSTED, Status.UNKNOWN})
# Reasons found by looking at the image itself (the ImageSource's checks).
IMAGE_REASONS = frozenset(
    {
        Reason.PATH_OUTSIDE_ROOT,
        Reason.IMAGE_MISSING,
        Reason.IMAGE_NOT_FILE,
        Reason.IMAGE_UNREADABLE,
        Reason.IMAGE_EMPTY,
        Reason.IMAGE_TOO_LARGE,
        Reason.IMAGE_NOT_JPEG_OR_PNG,
        Reason.IMAGE_TRUNCATED,
        Reason.IMAGE_UNDECODABLE,
    }
)


def parse_states(raw: str, *, allowed: frozenset[State], what: str) -> list[State]:
    """States named in a comma-separated list; ValueError naming each unknown one and what is allowed."""
    names = [part.strip() for part in raw.split(",") if part.strip()]
    known = {s.value: s for s in State}
    listed = ", ".join(sorted(allowed))
    unknown = [n for n in names if n not in known]
    if unknown:
        said = []
        for name in unknown:
            near = difflib.get_close_matches(name.lower(), sorted(allowed), n=1)
            said.append(f"{name!r} is not a state" + (f" (did you mean {near[0]}?)" if near else ""))
        raise ValueError(f"{'; '.join(said)}: name some of {listed}")
    if not names:
        raise ValueError(f"no state is named: name some of {listed}")
    wrong = [n for n in names if known[n] not in allowed]
    if wrong:
        raise ValueError(f"{', '.join(map(repr, wrong))} can't be {what}; name some of {listed}")
    return [known[n] for n in names]
