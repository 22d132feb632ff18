"""What the migration report says: the whole ledger (every run, every user_id's final state) for a sign-off."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ...ledger import LedgerRow, LedgerStatus, Store
from ...vocab import TRANSIENT_STATES, State
from . import fmt

__all__ = ["OPEN_STATES", "LedgerView", "MigrationPage", "build_migration", "read_ledger"]

# The states a person must look at: nothing a re-run does settles them on its own.
OPEN_STATES = (State.ID_CONFLICT, State.UNKNOWN, State.FAILED)
ROWS_SHOWN = 200  # per open state: the rest are one `backfill export` away
RUNS_READ = 1_000_000  # every run: a nightly job for decades stays far below this

_MEANINGS: dict[str, str] = {
    State.ENROLLED: "answered 0840 with a verified signature",
    State.ALREADY_ENROLLED: "2209 for an ID whose earlier answer was lost: that attempt enrolled it",
    State.ID_CONFLICT: "2209 for an ID this tool never sent: someone else holds it; a person must look",
    State.FAILED: "a permanent answer; backfill retry --status failed after fixing the photo",
    State.RETRY_EXHAUSTED: "transient errors on every attempt; nothing enrolled; backfill retry re-sends",
    State.UNKNOWN: "the last answer was lost or untrusted: the user may be enrolled; backfill retry resolves it",
    State.PENDING: "a run stopped before this row finished, and nothing sent for it can have enrolled it; "
    "backfill retry sends it",
    State.SENDING: "an attempt was on the wire when its run ended; backfill retry resolves it",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerView:
    """What the report reads from a ledger, through the Store contract only."""

    status: LedgerStatus
    open_rows: dict[State, tuple[LedgerRow, ...]]  # the first ROWS_SHOWN of each open state, by user_id


async def read_ledger(store: Store, *, shown: int = ROWS_SHOWN) -> LedgerView:
    """Counts, every run, and the first `shown` rows of each open state, through the Store contract."""
    status = await store.status(last_runs=RUNS_READ)
    open_rows: dict[State, tuple[LedgerRow, ...]] = {}
    for state in OPEN_STATES:
        if not status.counts.get(state, 0):
            continue
        rows: list[LedgerRow] = []
        source = store.rows([state])
        try:
            async for row in source:
                rows.append(row)
                if len(rows) >= shown:
                    break
        finally:
            # Closed at once: a reader left half-way must not hold the ledger's cursor until collected.
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
        open_rows[state] = tuple(rows)
    return LedgerView(status=status, open_rows=open_rows)


# --- what the template gets ---


@dataclass(frozen=True, slots=True, kw_only=True)
class Fact:
    label: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StateRow:
    state: str
    meaning: str
    rows: str
    share: str
    zero: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLine:
    run_id: str
    started_at: str
    finished_at: str
    manifest: str
    manifest_sha256: str
    rows: str
    exit_code: str
    by: str  # the audit trail: operator@host
    api_key_id: str
    version: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenItem:
    user_id: str
    attempts: str
    answer: str
    last_attempt_at: str
    run_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenGroup:
    state: str
    meaning: str
    total: str
    items: tuple[OpenItem, ...]
    hidden: int  # rows of this state not listed here
    export: str  # the command that lists them all


@dataclass(frozen=True, slots=True, kw_only=True)
class MigrationPage:
    title: str
    ledger: str
    verdict: str
    tone: str  # "ok" or "warn"
    facts: tuple[Fact, ...]
    states: tuple[StateRow, ...]
    total: str
    runs: tuple[RunLine, ...]
    open_groups: tuple[OpenGroup, ...]
    written: str


def build_migration(view: LedgerView, written: datetime) -> MigrationPage:
    status = view.status
    counts = status.counts
    total = sum(counts.values())
    order = [s.value for s in State if s.value in counts or s in OPEN_STATES or s is State.ENROLLED]
    order += sorted(k for k in counts if k not in order)  # a state this version doesn't know still counts
    states = tuple(
        StateRow(
            state=k,
            meaning=_MEANINGS.get(k, ""),
            rows=fmt.count(counts.get(k, 0)),
            share=fmt.share(counts.get(k, 0), total),
            zero=not counts.get(k, 0),
        )
        for k in order
    )
    open_count = sum(counts.get(s, 0) for s in OPEN_STATES)
    waiting = sum(counts.get(s, 0) for s in TRANSIENT_STATES if s not in OPEN_STATES)
    if open_count or waiting:
        parts = [f"{fmt.count(counts[s])} {s.value}" for s in OPEN_STATES if counts.get(s, 0)]
        verdict = (
            f"{fmt.count(open_count)} user_ids need a person ({', '.join(parts)})"
            if open_count
            else "No user_id needs a person"
        )
        if waiting:
            verdict += f"; {fmt.count(waiting)} are waiting for a retry"
        tone = "warn"
    else:
        verdict = f"All {fmt.count(total)} user_ids in the ledger are done; none needs a person"
        tone = "ok"
    runs = sorted(status.runs, key=lambda r: r.started_at)
    b = status.binding
    facts = (
        Fact(label="Ledger", value=status.location),
        Fact(label="Partner", value=b.partner_id),
        Fact(label="API endpoint", value=b.endpoint),
        Fact(label="User IDs", value=fmt.count(total)),
        # Tombstones, in no state's count: users erased on request (`backfill forget`, `purge`), never sent again.
        Fact(label="Forgotten on request", value=fmt.count(status.forgotten)),
        Fact(label="Runs", value=fmt.count(len(runs))),
        Fact(label="First run started", value=runs[0].started_at if runs else "(no run)"),
        Fact(label="Last run started", value=runs[-1].started_at if runs else "(no run)"),
    )
    return MigrationPage(
        title=f"Backfill migration report: {b.partner_id} on {b.endpoint}",
        ledger=status.location,
        verdict=verdict,
        tone=tone,
        facts=facts,
        states=states,
        total=fmt.count(total),
        runs=tuple(
            RunLine(
                run_id=r.run_id,
                started_at=r.started_at,
                finished_at=r.finished_at or "(not finished)",
                manifest=r.manifest,
                manifest_sha256=r.manifest_sha256 or "(not recorded)",
                rows="" if r.rows is None else fmt.count(r.rows),
                exit_code="" if r.exit_code is None else str(r.exit_code),
                by=f"{r.operator or '(not recorded)'}@{r.host or '(not recorded)'}",
                api_key_id=r.api_key_id or "(not recorded)",
                version=r.version or "(not recorded)",
            )
            for r in runs
        ),
        open_groups=tuple(_group(s, counts.get(s, 0), view.open_rows.get(s, ())) for s in OPEN_STATES),
        written=written.strftime("%Y-%m-%d %H:%M:%S UTC"),
    )


def _group(state: State, total: int, rows: tuple[LedgerRow, ...]) -> OpenGroup:
    items = tuple(
        OpenItem(
            user_id=r.user_id,
            attempts=str(r.attempts),
            answer=fmt.clip(
                " ".join(filter(None, [r.result_code, r.result_text]))
                or (f"HTTP {r.http_status}" if r.http_status is not None else "(no answer)")
            ),
            last_attempt_at=r.last_attempt_at or "",
            run_id=r.run_id or "",
        )
        for r in rows
    )
    return OpenGroup(
        state=state.value,
        meaning=_MEANINGS.get(state, ""),
        total=fmt.count(total),
        items=items,
        hidden=max(0, total - len(items)),
        export=f"backfill export --status {state.value} --out {state.value}.csv",
    )
