"""What report.html says: a run's figures turned into the sentences, rows and charts its templates lay out."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ...vocab import EXIT_MEANINGS, FINE_STATUSES, Status
from . import fmt, svg
from .data import MAX_ATTEMPTS_KEY, Kinds, Results, Run

__all__ = ["Page", "build_page"]

_STATUS_MEANINGS: dict[str, str] = {
    Status.ENROLLED: "answered 0840 with a verified signature",
    Status.ALREADY_ENROLLED: "2209 for an ID whose earlier answer was lost: that attempt enrolled it",
    Status.SKIPPED: "already enrolled in the ledger: not sent",
    Status.FORGOTTEN: "forgotten on request (backfill forget or purge): never sent again",
    Status.ID_CONFLICT: "2209 for an ID this tool never sent: someone else holds it; a person must look",
    Status.FAILED: "a permanent answer: see the error codes below",
    Status.RETRY_EXHAUSTED: "transient errors on every attempt; nothing enrolled; a re-run retries",
    Status.UNKNOWN: "an answer was lost or untrusted (or a stop came before the retry after one): the user may be "
    "enrolled; a re-run resolves it",
    Status.PENDING: "the run stopped before this row finished, and nothing sent for it can have enrolled it; a "
    "re-run sends it",
    Status.DRY_RUN: "--dry-run: built and signed, not sent",
}
_NOT_RECORDED = "(not recorded)"


# --- what the templates get ---


@dataclass(frozen=True, slots=True, kw_only=True)
class Fact:
    label: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    verdict: str
    tone: Literal["ok", "warn"]
    facts: tuple[Fact, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TotalRow:
    key: str  # the row's data-status
    label: str
    is_status: bool  # a status name (set as code), not a description
    meaning: str
    rows: str
    share: str
    zero: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Totals:
    rows: tuple[TotalRow, ...]
    total: str
    total_share: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    ok: bool
    text: str
    figure: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KindRow:
    label: str
    rows: str
    statuses: tuple[Fact, ...]  # status and its row count
    message: str
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class KindsNote:
    """Said under a kinds table that doesn't show every kind."""

    shown_kinds: str
    kinds: str
    shown_rows: str
    rows: str
    untracked_rows: str  # empty when every row's kind was itemised
    limit: str


@dataclass(frozen=True, slots=True, kw_only=True)
class KindTable:
    label_head: str
    with_statuses: bool
    rows: tuple[KindRow, ...]
    note: KindsNote | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Errors:
    empty: str  # what the section says instead of a table, when there are no errors
    table: KindTable | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejects:
    rows: str
    table: KindTable | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareRow:
    label: str
    rows: str
    share: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Retries:
    facts: tuple[Fact, ...]
    attempts: tuple[ShareRow, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    empty: str
    bucket_amount: str = ""
    bucket_unit: str = ""
    started_at: str = ""
    peak_rate: str = ""
    average_rate: str = ""
    untimed: str = ""  # rows not drawn for want of a finish time; empty when none
    chart: svg.Chart | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    empty: str
    figures: tuple[Fact, ...] = ()
    overflow_from: str = ""  # where the shaded last bar starts; empty without one
    chart: svg.Chart | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    title: str
    header: Header
    totals: Totals
    checks: tuple[Check, ...]
    errors: Errors
    rejects: Rejects
    retries: Retries
    throughput: Throughput
    latency: Latency
    settings: tuple[Fact, ...]
    written: str
    folder: str


# --- building it ---


def build_page(run: Run, res: Results, rejects: Kinds, now: datetime) -> Page:
    return Page(
        title=f"Backfill run {run.run_id}" if run.run_id else "Backfill run",
        header=_header(run),
        totals=_totals(run),
        checks=_checks(run, res, rejects),
        errors=_errors(res),
        rejects=Rejects(
            rows=fmt.count(rejects.rows),
            table=_kind_table(rejects, "Reason", with_statuses=False) if rejects.rows else None,
        ),
        retries=_retries(run, res),
        throughput=_throughput(run, res),
        latency=_latency(run, res),
        settings=tuple(Fact(label=k, value=v) for k, v in run.settings),
        written=now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        folder=run.out_dir or run.run_id,
    )


def _header(run: Run) -> Header:
    problems = [(s, n) for s, n in run.counts if s not in FINE_STATUSES and s != Status.REJECTED and n]
    tone: Literal["ok", "warn"]
    if run.exit_code == 0:
        verdict, tone = "Complete", "ok"
    elif run.dry_run and run.exit_code is not None and run.exit_code <= 1:
        verdict, tone = "Dry run: nothing was sent", "warn"
    else:
        verdict, tone = "Needs attention", "warn"
    details = [f"{fmt.count(n)} {status.replace('_', ' ')}" for status, n in problems]
    if run.rejected:
        details.append(f"{fmt.count(run.rejected)} rejected")
    if run.not_reached:
        details.append(f"{fmt.count(run.not_reached)} not reached")
    meaning = EXIT_MEANINGS.get(run.exit_code, "") if run.exit_code is not None else "not recorded"
    line = f"{verdict}: exit code {run.exit_code if run.exit_code is not None else '?'}"
    line += f" ({meaning})" if meaning else ""
    if details:
        line += ". " + ", ".join(details) + "."
    facts = [
        ("Run", run.run_id),
        ("Environment", run.env),
        ("Base URL", run.base_url),
        ("Manifest", run.manifest),
        ("Manifest SHA-256", run.manifest_sha256 or _NOT_RECORDED),
        ("Ledger", run.ledger or _NOT_RECORDED),
        ("Output folder", run.out_dir),
        ("Started (UTC)", run.started_at or _NOT_RECORDED),
        ("Finished (UTC)", run.finished_at or _NOT_RECORDED),
        ("Duration", fmt.duration(run.duration_s) if run.duration_s is not None else _NOT_RECORDED),
        ("Rows per second", f"{run.rows_per_s:,g}" if run.rows_per_s is not None else _NOT_RECORDED),
        ("Exit code", f"{run.exit_code}" if run.exit_code is not None else _NOT_RECORDED),
        ("Stop reason", run.stop_reason or "none: the run read the whole manifest"),
        ("Dry run", "yes: nothing was sent" if run.dry_run else "no"),
    ]
    if run.new_rows is not None:
        facts.insert(11, ("New rows (not in the ledger before)", fmt.count(run.new_rows)))
    return Header(verdict=line, tone=tone, facts=tuple(Fact(label=k, value=v) for k, v in facts))


def _total_row(key: str, label: str, meaning: str, n: int, whole: int, *, is_status: bool = True) -> TotalRow:
    return TotalRow(
        key=fmt.clip(key),
        label=fmt.clip(label),
        is_status=is_status,
        meaning=meaning,
        rows=fmt.count(n),
        share=fmt.share(n, whole),
        zero=not n,
    )


def _totals(run: Run) -> Totals:
    counts = dict(run.counts)
    others = sorted(k for k in counts if k not in _STATUS_MEANINGS and k != Status.REJECTED)
    rows = []
    for status in [*(str(s) for s in _STATUS_MEANINGS), *others]:
        n = counts.get(status, 0)
        if status == Status.DRY_RUN and not n and not run.dry_run:
            continue
        rows.append(_total_row(status, status, _STATUS_MEANINGS.get(status, ""), n, run.total_rows))
    rejected = counts.get(Status.REJECTED, run.rejected)
    rows.append(
        _total_row(
            Status.REJECTED,
            Status.REJECTED,
            "in rejects.csv: fix the row and re-run",
            rejected,
            run.total_rows,
        )
    )
    rows.append(
        _total_row(
            "not_reached",
            "not reached",
            "never read or never sent (a --limit or a stop); a re-run continues",
            run.not_reached,
            run.total_rows,
            is_status=False,
        )
    )
    return Totals(
        rows=tuple(rows),
        total=fmt.count(run.total_rows),
        total_share=fmt.share(run.total_rows, run.total_rows),
    )


def _checks(run: Run, res: Results, rejects: Kinds) -> tuple[Check, ...]:
    """Cross-checks between summary.json and the CSVs: a mismatch means the files aren't one whole run."""
    summary_counts = {k: n for k, n in run.counts if k != Status.REJECTED and n}
    csv_counts = {k: n for k, n in res.counts if n}
    accounted = sum(n for _, n in run.counts) + run.not_reached
    n = fmt.count
    return (
        Check(
            text="results.csv rows per status match summary.json",
            ok=csv_counts == summary_counts,
            figure=f"results.csv: {n(res.rows)} rows",
        ),
        Check(
            text="rejects.csv rows match the rejected count",
            ok=rejects.rows == run.rejected,
            figure=f"{n(rejects.rows)} rows",
        ),
        Check(
            text="every manifest row is accounted for (statuses + rejected + not reached = total)",
            ok=accounted == run.total_rows,
            figure=f"{n(accounted)} of {n(run.total_rows)}",
        ),
        Check(
            text="rows sent match summary.json",
            ok=res.sent_rows == run.sent,
            figure=f"{n(res.sent_rows)} rows with attempts",
        ),
        Check(
            text="attempts match summary.json",
            ok=res.attempts == run.attempts,
            figure=f"{n(res.attempts)} attempts",
        ),
    )


def _kind_table(kinds: Kinds, label_head: str, *, with_statuses: bool) -> KindTable:
    rows = tuple(
        KindRow(
            label=fmt.clip(kind.label),
            rows=fmt.count(kind.count),
            statuses=tuple(Fact(label=fmt.clip(s), value=fmt.count(n)) for s, n in kind.statuses),
            message=fmt.clip(kind.message),
            examples=tuple(fmt.clip(x) for x in kind.examples),
        )
        for kind in kinds.top
    )
    note = None
    if kinds.kinds > len(kinds.top) or kinds.untracked_rows:
        note = KindsNote(
            shown_kinds=fmt.count(len(kinds.top)),
            kinds=fmt.count(kinds.kinds),
            shown_rows=fmt.count(sum(k.count for k in kinds.top)),
            rows=fmt.count(kinds.rows),
            untracked_rows=fmt.count(kinds.untracked_rows) if kinds.untracked_rows else "",
            limit=fmt.count(kinds.limit),
        )
    return KindTable(label_head=label_head, with_statuses=with_statuses, rows=rows, note=note)


def _errors(res: Results) -> Errors:
    if res.errors.rows:
        return Errors(empty="", table=_kind_table(res.errors, "Code", with_statuses=True))
    return Errors(
        empty=(
            "No errors: every row in results.csv is enrolled, already enrolled, skipped or a dry run."
            if res.rows
            else "No errors: results.csv has no rows."
        ),
        table=None,
    )


def _retries(run: Run, res: Results) -> Retries:
    multi = fmt.count(res.multi_attempt_rows)
    facts = (
        Fact(label="Rows sent", value=fmt.count(run.sent)),
        Fact(label="Attempts", value=fmt.count(run.attempts)),
        Fact(label="Retries (attempts - rows sent)", value=fmt.count(run.retries)),
        Fact(
            label="Rows needing more than one attempt",
            value=f"{multi} ({fmt.share(res.multi_attempt_rows, run.sent)} of sent)" if run.sent else multi,
        ),
    )
    attempts = tuple(
        ShareRow(
            label=(f"{a}+" if a == MAX_ATTEMPTS_KEY else str(a)) + ("" if a else " (not sent in this run)"),
            rows=fmt.count(n),
            share=fmt.share(n, res.rows),
        )
        for a, n in res.attempts_per_row
    )
    return Retries(facts=facts, attempts=attempts)


def _throughput(run: Run, res: Results) -> Throughput:
    t = res.throughput
    if res.rows == 0:
        return Throughput(empty="No rows sent: results.csv has no rows.")
    if t is None:
        return Throughput(
            empty="summary.json has no start or finish time: throughput can't be placed in time."
        )
    peak = max(f + b for f, b in t.buckets)
    if not peak:
        return Throughput(empty="No row in results.csv has a finish time: nothing to place in time.")
    amount, unit = fmt.bucket(t.bucket_s)
    return Throughput(
        empty="",
        bucket_amount=amount,
        bucket_unit=unit,
        started_at=run.started_at,
        peak_rate=f"{peak / t.bucket_s:,.3g}",
        average_rate=f"{run.rows_per_s if run.rows_per_s is not None else 0:,g}",
        untimed=fmt.count(t.untimed) if t.untimed else "",
        chart=svg.throughput_chart(t.buckets, t.bucket_s),
    )


def _latency(run: Run, res: Results) -> Latency:
    lat = res.latency
    if lat is None:
        if not res.has_latency_column:
            reason = "results.csv has no latency_ms column (written by an older version of this tool)."
        elif run.dry_run:
            reason = "No rows sent: a dry run sends nothing."
        else:
            reason = "No rows sent: no latencies were recorded."
        return Latency(empty=reason)
    figures = (
        Fact(label="Rows with a latency", value=fmt.count(lat.rows)),
        Fact(label="p50", value=fmt.ms(lat.p50_ms)),
        Fact(label="p90", value=fmt.ms(lat.p90_ms)),
        Fact(label="p99", value=fmt.ms(lat.p99_ms)),
        Fact(label="max", value=fmt.ms(lat.max_ms)),
        Fact(label="mean", value=fmt.ms(lat.mean_ms)),
        Fact(label="min", value=fmt.ms(lat.min_ms)),
    )
    last = lat.bins[-1]
    return Latency(
        empty="",
        figures=figures,
        overflow_from=fmt.ms(last.low) if last.overflow else "",
        chart=svg.latency_chart(lat.bins, p50_ms=lat.p50_ms, p99_ms=lat.p99_ms),
    )
