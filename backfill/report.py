"""report.html for a finished run: the figures a person needs to sign off a migration, in one offline file."""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import OutputError
from .outputs import files as rs

__all__ = ["REPORT_NAME", "write_report"]

REPORT_NAME = "report.html"
MAX_BUCKETS = 60  # throughput bars: more than this is unreadable on a printed page
LATENCY_BINS = 30
TOP = 10
EXAMPLES = 3
# A file with millions of distinct error texts must not grow the tally without end; beyond this many kinds,
# rows are still counted, as not itemised.
MAX_KINDS = 10_000
MAX_ATTEMPTS_KEY = 100
MAX_SHOWN_CHARS = 300  # a multi-kilobyte error text would push the tables off the page
REDACTED = "***"
# Settings are redacted before summary.json is written; this is a second lock on the same door.
_SECRET_KEY = re.compile(r"api[_-]?key|secret|token|passw|credential|private", re.IGNORECASE)
_BUCKET_SIZES_S = (
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400,
)  # fmt: skip

_STATUS_MEANINGS: dict[str, str] = {
    rs.ENROLLED: "answered 0840 with a verified signature",
    rs.ALREADY_ENROLLED: "2209 for an ID whose earlier answer was lost: that attempt enrolled it",
    rs.SKIPPED: "already enrolled in the checkpoint: not sent",
    rs.ID_CONFLICT: "2209 for an ID this tool never sent: someone else holds it; a person must look",
    rs.FAILED: "a permanent answer: see the error codes below",
    rs.RETRY_EXHAUSTED: "transient errors on every attempt; nothing enrolled; a re-run retries",
    rs.UNKNOWN: "the last answer was lost or untrusted: the user may be enrolled; a re-run resolves it",
    rs.PENDING: "the run stopped before this row finished; a re-run sends it",
    rs.DRY_RUN: "--dry-run: built and signed, not sent",
}
_EXIT_MEANINGS: dict[int, str] = {
    0: "every valid row is enrolled, already enrolled or skipped, and nothing was rejected",
    1: "finished with rejected rows or rows not done",
    2: "usage or configuration error, unreadable manifest, checkpoint or output folder: nothing was sent",
    3: "another run held the checkpoint",
    4: "stopped early on a systemic API error: check the key, environment and clock",
    130: "interrupted by SIGINT; every attempt is recorded, re-run to resume",
    143: "interrupted by SIGTERM; every attempt is recorded, re-run to resume",
}
_FINE = rs.OK_STATUSES | {rs.DRY_RUN}


# --- values ---


@dataclass(frozen=True, slots=True)
class _Kind:
    """One error code or reject reason: how many rows, which statuses, a message and a few user_ids."""

    label: str
    count: int
    statuses: tuple[tuple[str, int], ...]
    message: str
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Kinds:
    top: tuple[_Kind, ...]
    rows: int
    kinds: int
    untracked_rows: int  # rows whose kind arrived after MAX_KINDS kinds were already held


@dataclass(frozen=True, slots=True)
class _Bin:
    low: float
    high: float
    count: int
    overflow: bool = False


@dataclass(frozen=True, slots=True)
class _Latency:
    rows: int
    mean_ms: float
    min_ms: int
    p50_ms: int
    p90_ms: int
    p99_ms: int
    max_ms: int
    bins: tuple[_Bin, ...]


@dataclass(frozen=True, slots=True)
class _Throughput:
    start: datetime
    bucket_s: float
    buckets: tuple[tuple[int, int], ...]  # (rows fine, rows not fine) finished in each bucket
    untimed: int  # rows with no readable finished_at


@dataclass(frozen=True, slots=True)
class _Results:
    rows: int
    counts: tuple[tuple[str, int], ...]
    sent_rows: int
    attempts: int
    multi_attempt_rows: int
    attempts_per_row: tuple[tuple[int, int], ...]
    errors: _Kinds
    latency: _Latency | None
    has_latency_column: bool
    throughput: _Throughput | None


@dataclass(frozen=True, slots=True)
class _Run:
    run_id: str
    env: str
    base_url: str
    manifest: str
    out_dir: str
    started_at: str
    finished_at: str
    duration_s: float | None
    total_rows: int
    counts: tuple[tuple[str, int], ...]
    rejected: int
    sent: int
    attempts: int
    retries: int
    new_rows: int | None  # absent from summaries written before it was recorded
    not_reached: int
    rows_per_s: float | None
    exit_code: int | None
    stop_reason: str
    dry_run: bool
    settings: tuple[tuple[str, str], ...]


# --- the public entry point ---


def write_report(run_dir: Path, *, overwrite: bool = False) -> Path:
    """Write report.html into a finished run folder and return its path.

    Refuses when the report exists unless `overwrite`, so a re-render is a deliberate act. Raises OutputError
    when the folder isn't a finished run or a file can't be read or written.
    """
    summary_path = run_dir / "summary.json"
    results_path = run_dir / "results.csv"
    rejects_path = run_dir / "rejects.csv"
    target = run_dir / REPORT_NAME
    if not overwrite and target.exists():
        raise OutputError(f"{target} already exists; pass overwrite=True to write it again")
    run = _read_summary(summary_path)
    results = _read_results(results_path, run)
    rejects = _read_rejects(rejects_path)
    page = _render(run, results, rejects, datetime.now(UTC))
    _write_private(target, page, overwrite=overwrite)
    return target


def _write_private(target: Path, page: str, *, overwrite: bool) -> None:
    if not overwrite:
        _write_new(target, page)  # O_EXCL: a report that appeared since the check above is not clobbered
        return
    # A fresh file swapped in whole: a reader never sees half a report, and a symlink planted at the target
    # is replaced rather than followed.
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    _write_new(temp, page)
    try:
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"can't write {target}: {exc.strerror}") from exc


def _write_new(path: Path, page: str) -> None:
    """Create `path` owner-only with O_EXCL, holding `page`; on failure nothing is left behind."""
    out = rs._open_private(path)
    try:
        with out:
            out.write(page)
    except OSError as exc:
        path.unlink(missing_ok=True)  # ours, O_EXCL made it: half a report must not pass for a whole one
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc


# --- reading ---


def _read_summary(path: Path) -> _Run:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(
            f"{path.parent} has no summary.json: the run didn't finish, or this isn't a run folder"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OutputError(f"can't read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise OutputError(f"can't read {path}: expected a JSON object")
    counts = raw.get("counts")
    settings = raw.get("settings")
    return _Run(
        run_id=_text(raw, "run_id"),
        env=_text(raw, "env"),
        base_url=_text(raw, "base_url"),
        manifest=_text(raw, "manifest"),
        out_dir=_text(raw, "out_dir"),
        started_at=_text(raw, "started_at"),
        finished_at=_text(raw, "finished_at"),
        duration_s=_number(raw, "duration_s"),
        total_rows=_whole(raw, "total_rows"),
        counts=tuple((str(k), _whole(counts, k)) for k in counts) if isinstance(counts, dict) else (),
        rejected=_whole(raw, "rejected"),
        sent=_whole(raw, "sent"),
        attempts=_whole(raw, "attempts"),
        retries=(
            _whole(raw, "retries")
            if _number(raw, "retries") is not None
            else max(0, _whole(raw, "attempts") - _whole(raw, "sent"))
        ),
        new_rows=_whole(raw, "new_rows") if _number(raw, "new_rows") is not None else None,
        not_reached=_whole(raw, "not_reached"),
        rows_per_s=_number(raw, "rows_per_s"),
        exit_code=_whole(raw, "exit_code") if _number(raw, "exit_code") is not None else None,
        stop_reason=_text(raw, "stop_reason"),
        dry_run=raw.get("dry_run") is True,
        settings=tuple(_flatten_settings(settings)) if isinstance(settings, dict) else (),
    )


def _text(d: Mapping[str, Any], key: str) -> str:
    value = d.get(key)
    return "" if value is None else str(value)


def _number(d: Mapping[str, Any], key: str) -> float | None:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _whole(d: Mapping[str, Any], key: str) -> int:
    value = _number(d, key)
    return int(value) if value is not None else 0


def _flatten_settings(settings: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for key in sorted(settings, key=str):
        name = f"{prefix}{key}"
        value = settings[key]
        if _SECRET_KEY.search(name):
            yield name, REDACTED if value else "(not set)"
        elif isinstance(value, dict):
            yield from _flatten_settings(value, name + ".")
        elif value is None:
            yield name, "(not set)"
        elif isinstance(value, str):
            yield name, value
        else:
            yield name, json.dumps(value)


def _open_csv(path: Path) -> Iterator[list[str]]:
    """The header's fields, then each record's, read one at a time: results.csv can hold millions."""
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle)
            try:
                yield from reader
            except csv.Error as exc:
                raise OutputError(f"can't read {path}, line {reader.line_num}: {exc}") from exc
    except FileNotFoundError:
        raise OutputError(f"{path.parent} has no {path.name}: not a complete run folder") from None
    except OSError as exc:
        raise OutputError(f"can't read {path}: {exc.strerror}") from exc


def _columns(path: Path, header: list[str] | None, needed: tuple[str, ...]) -> dict[str, int]:
    index = {name: i for i, name in enumerate(header or [])}
    missing = [name for name in needed if name not in index]
    if missing:
        raise OutputError(f"{path} has no {', '.join(missing)} column: not a file this tool wrote")
    return index


def _cell(fields: list[str], i: int | None) -> str:
    """A field by column index; a short row (a hand-edited file) reads as empty fields, not a crash."""
    return fields[i] if i is not None and i < len(fields) else ""


def _read_results(path: Path, run: _Run) -> _Results:
    records = _open_csv(path)
    col = _columns(path, next(records, None), ("user_id", "status"))
    i_user, i_status = col["user_id"], col["status"]
    i_http, i_code, i_text = col.get("http_status"), col.get("result_code"), col.get("result_text")
    i_error, i_attempts = col.get("error"), col.get("attempts")
    i_finished, i_latency = col.get("finished_at"), col.get("latency_ms")

    statuses = _KindTally()
    errors = _KindTally()
    latency = _LatencyTally()
    attempts_per_row: Counter[int] = Counter()
    timeline = _Timeline.for_run(run)
    rows = sent_rows = attempts = multi = 0
    for fields in records:
        if not fields:
            continue
        rows += 1
        user_id, status = _cell(fields, i_user), _cell(fields, i_status)
        statuses.add(status, "", "", "")
        tries = _int_or_none(_cell(fields, i_attempts)) or 0
        attempts += tries
        attempts_per_row[min(tries, MAX_ATTEMPTS_KEY)] += 1
        if tries > 0:
            sent_rows += 1
        if tries > 1:
            multi += 1
        fine = status in _FINE
        if not fine:
            http, code = _cell(fields, i_http), _cell(fields, i_code)
            error, text = _cell(fields, i_error), _cell(fields, i_text)
            label = (
                code
                or (f"HTTP {http}" if http else "")
                or error
                or ("not sent" if not tries else "no answer")
            )
            errors.add(label, user_id, error or text, status)
        ms = _int_or_none(_cell(fields, i_latency))
        if ms is not None and ms >= 0:
            latency.add(ms)
        if timeline is not None:
            timeline.add(_cell(fields, i_finished), fine)
    return _Results(
        rows=rows,
        counts=tuple((k.label, k.count) for k in statuses.top(MAX_KINDS).top),
        sent_rows=sent_rows,
        attempts=attempts,
        multi_attempt_rows=multi,
        attempts_per_row=tuple(sorted(attempts_per_row.items())),
        errors=errors.top(TOP),
        latency=latency.result(),
        has_latency_column=i_latency is not None,
        throughput=timeline.result() if timeline is not None else None,
    )


def _read_rejects(path: Path) -> _Kinds:
    records = _open_csv(path)
    col = _columns(path, next(records, None), ("line", "user_id", "reason"))
    i_line, i_user, i_reason, i_message = col["line"], col["user_id"], col["reason"], col.get("message")
    reasons = _KindTally()
    for fields in records:
        if not fields:
            continue
        line, user_id = _cell(fields, i_line), _cell(fields, i_user)
        example = f"line {line}: {user_id}" if line else user_id
        reasons.add(_cell(fields, i_reason), example, _cell(fields, i_message), "")
    return reasons.top(TOP)


def _int_or_none(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


# --- bounded tallies ---


class _KindTally:
    """Rows per kind with a message and a few examples, holding at most MAX_KINDS kinds."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._statuses: dict[str, Counter[str]] = {}
        self._messages: dict[str, str] = {}
        self._examples: dict[str, list[str]] = {}
        self._untracked = 0

    def add(self, label: str, example: str, message: str, status: str) -> None:
        # Kinds are told apart by their start: a long error text must not be held whole, 10,000 times over.
        label = label[: MAX_SHOWN_CHARS + 1]
        if label not in self._counts:
            if len(self._counts) >= MAX_KINDS:
                self._untracked += 1
                return
            self._counts[label] = 0
            self._statuses[label] = Counter()
            # Only the start is kept: the page shows no more, and a huge field must not be held.
            self._messages[label] = message[: MAX_SHOWN_CHARS + 1]
            self._examples[label] = []
        self._counts[label] += 1
        if status:
            self._statuses[label][status] += 1
        examples = self._examples[label]
        if example and len(examples) < EXAMPLES:
            examples.append(example[: MAX_SHOWN_CHARS + 1])

    def top(self, n: int) -> _Kinds:
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return _Kinds(
            top=tuple(
                _Kind(
                    label,
                    count,
                    tuple(sorted(self._statuses[label].items(), key=lambda kv: (-kv[1], kv[0]))),
                    self._messages[label],
                    tuple(self._examples[label]),
                )
                for label, count in ranked
            ),
            rows=sum(self._counts.values()) + self._untracked,
            kinds=len(self._counts),
            untracked_rows=self._untracked,
        )


def _latency_key(ms: int) -> int:
    """Exact below a second, else rounded down to 3 significant figures: at most ~1,000 keys per decade."""
    if ms < 1000:
        return ms
    step = int(10 ** (len(str(ms)) - 3))
    return ms - ms % step


class _LatencyTally:
    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._rows = 0
        self._total = 0
        self._min: int | None = None
        self._max = 0

    def add(self, ms: int) -> None:
        self._counts[_latency_key(ms)] += 1
        self._rows += 1
        self._total += ms
        self._max = max(self._max, ms)
        self._min = ms if self._min is None else min(self._min, ms)

    def result(self) -> _Latency | None:
        if not self._rows or self._min is None:
            return None
        ordered = sorted(self._counts.items())
        p50, p90, p99 = (_percentile(ordered, self._rows, p) for p in (50, 90, 99))
        return _Latency(
            rows=self._rows,
            mean_ms=self._total / self._rows,
            min_ms=self._min,
            p50_ms=p50,
            p90_ms=p90,
            p99_ms=min(p99, self._max),
            max_ms=self._max,
            # Binned from the rounded keys' own minimum: the exact minimum can lie above its rounded key.
            bins=_latency_bins(ordered, ordered[0][0], p99, self._max),
        )


def _percentile(ordered: list[tuple[int, int]], rows: int, p: float) -> int:
    """Nearest rank: the smallest value with at least p% of rows at or below it."""
    rank = max(1, math.ceil(p / 100 * rows))
    seen = 0
    for value, count in ordered:
        seen += count
        if seen >= rank:
            return value
    return ordered[-1][0]


def _latency_bins(ordered: list[tuple[int, int]], low: int, p99: int, high: int) -> tuple[_Bin, ...]:
    # A few timeouts would squash every other bar into one; past 3x p99 they get a bar of their own.
    tail = p99 > 0 and high > 3 * p99
    top = p99 if tail else high
    width = max(1, int(_nice_step((top - low) / LATENCY_BINS))) if top > low else 1
    start = low - low % width
    count = max(1, math.ceil((top + 1 - start) / width))
    bins = [0] * count
    overflow = 0
    for value, n in ordered:
        index = max(0, (value - start) // width)
        if index >= count:
            if tail:
                overflow += n
                continue
            index = count - 1
        bins[index] += n
    out = [_Bin(start + i * width, start + (i + 1) * width, n) for i, n in enumerate(bins)]
    if tail:
        edge = start + count * width
        out.append(_Bin(edge, high, overflow, overflow=True))
    return tuple(out)


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 5 x 10^k that is at least `raw`: axis steps a person reads at a glance."""
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw * (1 - 1e-9):
            return float(factor * power)
    return float(10 * power)


def _parse_time(raw: str) -> datetime | None:
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _bucket_size(span_s: float) -> float:
    for size in _BUCKET_SIZES_S:
        if span_s / size <= MAX_BUCKETS:
            return float(size)
    return 86400.0 * math.ceil(span_s / 86400 / MAX_BUCKETS)


class _Timeline:
    def __init__(self, start: datetime, end: datetime) -> None:
        span = max(0.0, (end - start).total_seconds())
        self._start = start
        self._size = _bucket_size(span)
        count = max(1, math.ceil(span / self._size - 1e-9))
        self._fine = [0] * count
        self._bad = [0] * count
        self._untimed = 0

    @classmethod
    def for_run(cls, run: _Run) -> _Timeline | None:
        start, end = _parse_time(run.started_at), _parse_time(run.finished_at)
        if start is None or end is None:
            return None
        return cls(start, end)

    def add(self, finished_at: str, fine: bool) -> None:
        moment = _parse_time(finished_at)
        if moment is None:
            self._untimed += 1
            return
        index = int((moment - self._start).total_seconds() // self._size)
        index = min(max(index, 0), len(self._fine) - 1)
        if fine:
            self._fine[index] += 1
        else:
            self._bad[index] += 1

    def result(self) -> _Throughput:
        return _Throughput(
            self._start, self._size, tuple(zip(self._fine, self._bad, strict=True)), self._untimed
        )


# --- formatting ---


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _clip(text: str) -> str:
    """Escaped, and cut short: for free text from the CSVs, which can be kilobytes long."""
    return _e(text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "…")


def _n(value: int) -> str:
    return f"{value:,}"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s"


def _bucket_text(seconds: float) -> str:
    for unit, name in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= unit:
            count = seconds / unit
            plural = "s" if name == "day" and count != 1 else ""
            return f"{count:g}&nbsp;{name}{plural}"
    return f"{seconds:g}&nbsp;s"


def _offset(seconds: float) -> str:
    """An axis label: the shortest exact form of an offset from the run's start."""
    if seconds == 0:
        return "0"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m" + (f"{secs:02d}s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h" + (f"{minutes:02d}m" if minutes else "")


def _ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:,.3g} s" if value < 100_000 else f"{value / 1000:,.0f} s"
    return f"{value:,.0f} ms"


def _row(*cells: str, cls: str = "", attrs: str = "") -> str:
    """A table row from already-escaped cells; a cell starting with '#' is right-aligned (a number)."""
    out = []
    for cell in cells:
        if cell.startswith("#"):
            out.append(f'<td class="n">{cell[1:]}</td>')
        else:
            out.append(f"<td>{cell}</td>")
    klass = f' class="{cls}"' if cls else ""
    return f"<tr{klass}{attrs}>{''.join(out)}</tr>"


def _table(headers: tuple[str, ...], widths: tuple[int, ...], rows: list[str], cls: str = "") -> str:
    """A fixed-layout table: columns get these percentages of the width whatever the content, so a long
    value wraps inside its cell instead of pushing the table off a printed page."""
    cols = "".join(f'<col style="width:{w}%">' for w in widths)
    heads = "".join(f'<th class="n">{h[1:]}</th>' if h.startswith("#") else f"<th>{h}</th>" for h in headers)
    klass = f' class="{cls}"' if cls else ""
    return (
        f"<table{klass}><colgroup>{cols}</colgroup><thead><tr>{heads}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _empty(message: str) -> str:
    return f'<p class="empty">{_e(message)}</p>'


# --- the page ---


def _render(run: _Run, res: _Results, rejects: _Kinds, now: datetime) -> str:
    sections = [
        _header(run),
        _totals(run),
        _checks(run, res, rejects),
        _errors(res),
        _rejects(rejects),
        _retries(run, res),
        _throughput(run, res),
        _latency(run, res),
        _settings(run),
        _signoff(),
    ]
    title = f"Backfill run {run.run_id}" if run.run_id else "Backfill run"
    written = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        # Belt and braces: should anything slip past escaping, the browser still runs and fetches nothing.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>"
        + "".join(sections)
        + f'<footer class="note">Report written {_e(written)} from summary.json, results.csv and rejects.csv '
        f"in {_e(run.out_dir or run.run_id)}.</footer></main></body></html>\n"
    )


def _problem_counts(run: _Run) -> list[tuple[str, int]]:
    return [(status, n) for status, n in run.counts if status not in _FINE and status != rs.REJECTED and n]


def _header(run: _Run) -> str:
    problems = _problem_counts(run)
    if run.exit_code == 0:
        verdict, cls = "Complete", "ok"
    elif run.dry_run and run.exit_code is not None and run.exit_code <= 1:
        verdict, cls = "Dry run: nothing was sent", "warn"
    else:
        verdict, cls = "Needs attention", "warn"
    details = [f"{_n(n)} {status.replace('_', ' ')}" for status, n in problems]
    if run.rejected:
        details.append(f"{_n(run.rejected)} rejected")
    if run.not_reached:
        details.append(f"{_n(run.not_reached)} not reached")
    meaning = _EXIT_MEANINGS.get(run.exit_code, "") if run.exit_code is not None else "not recorded"
    line = f"{verdict}: exit code {run.exit_code if run.exit_code is not None else '?'}"
    line += f" ({meaning})" if meaning else ""
    if details:
        line += ". " + ", ".join(details) + "."
    started = run.started_at or "(not recorded)"
    finished = run.finished_at or "(not recorded)"
    facts = [
        ("Run", run.run_id),
        ("Environment", run.env),
        ("Base URL", run.base_url),
        ("Manifest", run.manifest),
        ("Output folder", run.out_dir),
        ("Started (UTC)", started),
        ("Finished (UTC)", finished),
        ("Duration", _duration(run.duration_s) if run.duration_s is not None else "(not recorded)"),
        ("Rows per second", f"{run.rows_per_s:,g}" if run.rows_per_s is not None else "(not recorded)"),
        ("Exit code", f"{run.exit_code}" if run.exit_code is not None else "(not recorded)"),
        ("Stop reason", run.stop_reason or "none: the run read the whole manifest"),
        ("Dry run", "yes: nothing was sent" if run.dry_run else "no"),
    ]
    if run.new_rows is not None:
        facts.insert(9, ("New rows (not in the checkpoint before)", _n(run.new_rows)))
    rows = [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts]
    return (
        f'<header><h1>Backfill run report</h1><p class="verdict {cls}">{_e(line)}</p>'
        f'<table class="facts">{"".join(rows)}</table></header>'
    )


def _totals(run: _Run) -> str:
    counts = dict(run.counts)
    order = [*_STATUS_MEANINGS, *sorted(k for k in counts if k not in _STATUS_MEANINGS and k != rs.REJECTED)]
    rows = []
    for status in order:
        n = counts.get(status, 0)
        if status == rs.DRY_RUN and not n and not run.dry_run:
            continue
        rows.append(
            _row(
                f"<code>{_clip(status)}</code>",
                _e(_STATUS_MEANINGS.get(status, "")),
                "#" + _n(n),
                "#" + _share(n, run.total_rows),
                cls="" if n else "zero",
                attrs=f' data-status="{_clip(status)}"',
            )
        )
    rejected = counts.get(rs.REJECTED, run.rejected)
    rows.append(
        _row(
            "<code>rejected</code>",
            "in rejects.csv: fix the row and re-run",
            "#" + _n(rejected),
            "#" + _share(rejected, run.total_rows),
            cls="" if rejected else "zero",
            attrs=' data-status="rejected"',
        )
    )
    rows.append(
        _row(
            "not reached",
            "never read or never sent (a --limit or a stop); a re-run continues",
            "#" + _n(run.not_reached),
            "#" + _share(run.not_reached, run.total_rows),
            cls="" if run.not_reached else "zero",
            attrs=' data-status="not_reached"',
        )
    )
    rows.append(
        f'<tr class="total" data-status="total"><th colspan="2">Total rows in the manifest</th>'
        f'<td class="n">{_n(run.total_rows)}</td>'
        f'<td class="n">{_share(run.total_rows, run.total_rows)}</td></tr>'
    )
    return (
        '<section id="totals"><h2>Totals</h2>'
        + _table(("Status", "Meaning", "#Rows", "#Share"), (20, 53, 15, 12), rows, "totals")
        + "</section>"
    )


def _checks(run: _Run, res: _Results, rejects: _Kinds) -> str:
    """Cross-checks between summary.json and the CSVs: a mismatch means the files aren't one whole run."""
    summary_counts = {k: n for k, n in run.counts if k != rs.REJECTED and n}
    csv_counts = {k: n for k, n in res.counts if n}
    accounted = sum(n for _, n in run.counts) + run.not_reached
    checks = [
        (
            "results.csv rows per status match summary.json",
            csv_counts == summary_counts,
            f"results.csv: {_n(res.rows)} rows",
        ),
        (
            "rejects.csv rows match the rejected count",
            rejects.rows == run.rejected,
            f"{_n(rejects.rows)} rows",
        ),
        (
            "every manifest row is accounted for (statuses + rejected + not reached = total)",
            accounted == run.total_rows,
            f"{_n(accounted)} of {_n(run.total_rows)}",
        ),
        (
            "rows sent match summary.json",
            res.sent_rows == run.sent,
            f"{_n(res.sent_rows)} rows with attempts",
        ),
        ("attempts match summary.json", res.attempts == run.attempts, f"{_n(res.attempts)} attempts"),
    ]
    items = []
    for text, ok, figure in checks:
        mark = "✓ OK" if ok else "✗ MISMATCH"
        cls = "good" if ok else "bad"
        items.append(
            f'<li class="check {cls}"><strong>{mark}</strong> {_e(text)} <span>({figure})</span></li>'
        )
    return (
        f'<section id="checks"><h2>Consistency checks</h2><ul class="checks">{"".join(items)}</ul></section>'
    )


def _kinds_table(kinds: _Kinds, label_head: str, with_statuses: bool) -> str:
    rows = []
    for kind in kinds.top:
        # One status says it all; several get their own counts, one per line.
        statuses = (
            f"<code>{_clip(kind.statuses[0][0])}</code>"
            if len(kind.statuses) == 1
            else "<br>".join(f"<code>{_clip(s)}</code>&nbsp;{_n(n)}" for s, n in kind.statuses)
        )
        examples = "<br>".join(f"<code>{_clip(x)}</code>" for x in kind.examples)
        cells = [f"<code>{_clip(kind.label)}</code>", "#" + _n(kind.count)]
        if with_statuses:
            cells.append(statuses)
        cells += [_clip(kind.message), examples]
        rows.append(_row(*cells, attrs=f' data-kind="{_clip(kind.label)}"'))
    heads = (
        label_head,
        "#Rows",
        *(("Statuses",) if with_statuses else ()),
        "Message (first seen)",
        "Examples",
    )
    note = ""
    shown = sum(k.count for k in kinds.top)
    if kinds.kinds > len(kinds.top) or kinds.untracked_rows:
        note = (
            f'<p class="note">Top {len(kinds.top)} of {_n(kinds.kinds)} kinds shown, covering {_n(shown)} of '
            f"{_n(kinds.rows)} rows."
        )
        if kinds.untracked_rows:
            note += (
                f" {_n(kinds.untracked_rows)} rows had kinds beyond the first {_n(MAX_KINDS)} "
                "and are not itemised."
            )
        note += "</p>"
    widths = (13, 11, 19, 32, 25) if with_statuses else (18, 11, 44, 27)
    return _table(heads, widths, rows, "kinds") + note


def _errors(res: _Results) -> str:
    body = (
        _empty(
            "No errors: every row in results.csv is enrolled, already enrolled, skipped or a dry run."
            if res.rows
            else "No errors: results.csv has no rows."
        )
        if not res.errors.rows
        else '<p class="note">Rows in results.csv whose status is not enrolled, already enrolled, skipped '
        "or dry run, grouped by result_code, else HTTP status, else error text.</p>"
        + _kinds_table(res.errors, "Code", with_statuses=True)
    )
    return f'<section id="errors"><h2>Top error codes</h2>{body}</section>'


def _rejects(rejects: _Kinds) -> str:
    if not rejects.rows:
        body = _empty("No rows were rejected.")
    else:
        body = (
            f"<p>{_n(rejects.rows)} rows rejected before sending. Each is in rejects.csv with its line "
            "number and the fix.</p>" + _kinds_table(rejects, "Reason", with_statuses=False)
        )
    return f'<section id="rejects"><h2>Rejected rows</h2>{body}</section>'


def _retries(run: _Run, res: _Results) -> str:
    facts = [
        ("Rows sent", _n(run.sent)),
        ("Attempts", _n(run.attempts)),
        ("Retries (attempts - rows sent)", _n(run.retries)),
        (
            "Rows needing more than one attempt",
            f"{_n(res.multi_attempt_rows)} ({_share(res.multi_attempt_rows, run.sent)} of sent)"
            if run.sent
            else _n(res.multi_attempt_rows),
        ),
    ]
    rows = [f'<tr><th>{_e(k)}</th><td class="n">{v}</td></tr>' for k, v in facts]
    dist = [
        _row(
            _e(f"{a}+" if a == MAX_ATTEMPTS_KEY else str(a)) + ("" if a else " (not sent in this run)"),
            "#" + _n(n),
            "#" + _share(n, res.rows),
        )
        for a, n in res.attempts_per_row
    ]
    table = _table(("Attempts", "#Rows", "#Share"), (50, 25, 25), dist, "narrow") if dist else ""
    return (
        f'<section id="retries"><h2>Retries</h2><table class="facts narrow">{"".join(rows)}</table>'
        f"{('<h3>Attempts per row</h3>' + table) if table else ''}</section>"
    )


def _throughput(run: _Run, res: _Results) -> str:
    head = '<section id="throughput"><h2>Throughput over time</h2>'
    t = res.throughput
    if res.rows == 0:
        return head + _empty("No rows sent: results.csv has no rows.") + "</section>"
    if t is None:
        return (
            head
            + _empty("summary.json has no start or finish time: throughput can't be placed in time.")
            + "</section>"
        )
    peak = max(f + b for f, b in t.buckets)
    if not peak:
        return (
            head + _empty("No row in results.csv has a finish time: nothing to place in time.") + "</section>"
        )
    caption = (
        f"Rows finished per {_bucket_text(t.bucket_s)} since the start "
        f"({_e(run.started_at)} UTC); peak {peak / t.bucket_s:,.3g} rows/s, average "
        f"{run.rows_per_s if run.rows_per_s is not None else 0:,g} rows/s. "
        '<span class="key fine"></span> enrolled, already enrolled, skipped or dry run '
        '<span class="key bad"></span> any other status.'
    )
    if t.untimed:
        caption += f" {_n(t.untimed)} rows have no finish time and are not shown."
    return head + f'<p class="note">{caption}</p>' + _throughput_svg(t) + "</section>"


_W, _H = 960, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 30, 14, 44


def _y_axis(top_value: int) -> tuple[int, str]:
    """A rounded axis maximum and its gridlines with labels."""
    step = max(1, int(_nice_step(max(top_value, 1) / 5)))
    ymax = step * max(1, math.ceil(top_value / step))
    plot_h = _H - _TOP - _BOTTOM
    parts = []
    for value in range(0, ymax + 1, step):
        y = _TOP + plot_h - plot_h * value / ymax
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_n(value)}</text>'
        )
    return ymax, "".join(parts)


def _svg(label: str, body: str, x_caption: str) -> str:
    plot_bottom = _H - _BOTTOM
    return (
        f'<figure class="chart"><svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(label)}">'
        f"{body}"
        f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{plot_bottom}" y2="{plot_bottom}"/>'
        f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{plot_bottom}"/>'
        f'<text x="{(_LEFT + _W - _RIGHT) / 2:.0f}" y="{_H - 6}" text-anchor="middle">{_e(x_caption)}</text>'
        "</svg></figure>"
    )


def _throughput_svg(t: _Throughput) -> str:
    peak = max(f + b for f, b in t.buckets)
    ymax, grid = _y_axis(peak)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / len(t.buckets)
    gap = slot * 0.15 if len(t.buckets) > 1 else slot * 0.3
    parts = [grid]
    label_every = max(1, math.ceil(len(t.buckets) / 8))
    for i, (fine, bad) in enumerate(t.buckets):
        x = _LEFT + i * slot + gap / 2
        fine_h = plot_h * fine / ymax
        bad_h = plot_h * bad / ymax
        base = _TOP + plot_h
        lo, hi = _offset(i * t.bucket_s), _offset((i + 1) * t.bucket_s)
        tip = f"{lo} to {hi}: {fine + bad:,} rows ({bad:,} in other statuses)"
        parts.append(f"<g><title>{_e(tip)}</title>")
        if fine:
            parts.append(
                f'<rect class="fine" x="{x:.1f}" y="{base - fine_h:.1f}" width="{slot - gap:.1f}" '
                f'height="{fine_h:.1f}"/>'
            )
        if bad:
            parts.append(
                f'<rect class="bad" x="{x:.1f}" y="{base - fine_h - bad_h:.1f}" width="{slot - gap:.1f}" '
                f'height="{bad_h:.1f}"/>'
            )
        parts.append("</g>")
    for i in range(0, len(t.buckets) + 1, label_every):
        x = _LEFT + i * slot
        parts.append(
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">'
            f"{_e(_offset(i * t.bucket_s))}</text>"
        )
    return _svg("Rows finished over time", "".join(parts), "time since the start of the run")


def _latency(run: _Run, res: _Results) -> str:
    head = '<section id="latency"><h2>Latency</h2>'
    lat = res.latency
    if lat is None:
        if not res.has_latency_column:
            reason = "results.csv has no latency_ms column (written by an older version of this tool)."
        elif run.dry_run:
            reason = "No rows sent: a dry run sends nothing."
        else:
            reason = "No rows sent: no latencies were recorded."
        return head + _empty(reason) + "</section>"
    figures = [
        ("Rows with a latency", _n(lat.rows)),
        ("p50", _ms(lat.p50_ms)),
        ("p90", _ms(lat.p90_ms)),
        ("p99", _ms(lat.p99_ms)),
        ("max", _ms(lat.max_ms)),
        ("mean", _ms(lat.mean_ms)),
        ("min", _ms(lat.min_ms)),
    ]
    table = "".join(
        f'<tr data-figure="{_e(k)}"><th>{_e(k)}</th><td class="n">{_e(v)}</td></tr>' for k, v in figures
    )
    note = (
        '<p class="note">Each row\'s last attempt, request to answer. Latencies of a second or more are '
        "grouped to three significant figures, so percentiles above 1 s may read up to 1% low; max and mean "
        "are exact."
    )
    if lat.bins[-1].overflow:
        note += (
            f" The last bar, shaded differently, holds everything from {_ms(lat.bins[-1].low)} up to the max."
        )
    note += "</p>"
    return head + note + _latency_svg(lat) + f'<table class="facts narrow">{table}</table></section>'


def _latency_svg(lat: _Latency) -> str:
    ymax, grid = _y_axis(max(b.count for b in lat.bins))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / len(lat.bins)
    gap = min(2.0, slot * 0.1)
    base = _TOP + plot_h
    parts = [grid]
    for i, b in enumerate(lat.bins):
        x = _LEFT + i * slot + gap / 2
        h = plot_h * b.count / ymax
        span = f"≥ {_ms(b.low)}" if b.overflow else f"{_ms(b.low)} to < {_ms(b.high)}"
        cls = "bad" if b.overflow else "fine"
        parts.append(
            f"<g><title>{_e(f'{span}: {b.count:,} rows')}</title>"
            f'<rect class="{cls}" x="{x:.1f}" y="{base - h:.1f}" width="{slot - gap:.1f}" '
            f'height="{h:.1f}"/></g>'
        )
    label_every = max(1, math.ceil(len(lat.bins) / 10))
    for i in range(0, len(lat.bins), label_every):
        b = lat.bins[i]
        text = f"≥{_ms(b.low)}" if b.overflow else _ms(b.low)
        x = _LEFT + i * slot
        parts.append(f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{_e(text)}</text>')
    first, last_plain = lat.bins[0].low, lat.bins[-1].low if lat.bins[-1].overflow else lat.bins[-1].high
    plain_slots = len(lat.bins) - (1 if lat.bins[-1].overflow else 0)
    # Labels on two heights, so p50 and p99 stay legible when they are close or equal.
    for name, value, y in (("p50", lat.p50_ms, _TOP + 12), ("p99", lat.p99_ms, _TOP + 28)):
        if last_plain <= first or not first <= value <= last_plain:
            continue
        x = _LEFT + plain_slots * slot * (value - first) / (last_plain - first)
        near_right = x > _W - _RIGHT - 40
        label_x, anchor = (x - 4, "end") if near_right else (x + 4, "start")
        parts.append(
            f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP}" y2="{base}"/>'
            f'<text class="mark-label" x="{label_x:.1f}" y="{y}" text-anchor="{anchor}">{name}</text>'
        )
    return _svg("Latency histogram", "".join(parts), "latency of each row's last attempt")


def _settings(run: _Run) -> str:
    if not run.settings:
        return (
            '<section id="settings"><h2>Settings</h2>'
            + _empty("summary.json has no settings.")
            + "</section>"
        )
    rows = [_row(f"<code>{_e(k)}</code>", f"<code>{_e(v)}</code>") for k, v in run.settings]
    return (
        '<section id="settings"><h2>Settings</h2><p class="note">As resolved for this run; secrets are never '
        "shown.</p>" + _table(("Setting", "Value"), (35, 65), rows, "settings") + "</section>"
    )


def _signoff() -> str:
    rows = "".join(f"<tr><th>{k}</th><td></td></tr>" for k in ("Reviewed by", "Date", "Decision", "Notes"))
    return f'<section id="signoff"><h2>Sign-off</h2><table class="facts signoff">{rows}</table></section>'


_CSS = """
:root{color-scheme:light}
*{box-sizing:border-box}
body{margin:0;background:#fff;color:#1a202c;font-size:14px;line-height:1.45}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 10px}
h2{font-size:18px;margin:30px 0 8px;padding-bottom:4px;border-bottom:1px solid #cbd5e0}
h3{font-size:15px;margin:16px 0 4px}
table{border-collapse:collapse;table-layout:fixed;width:100%;margin:8px 0}
table.narrow{width:480px;max-width:100%}
th,td{border:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f7fafc;font-weight:600}
table.facts th{width:220px}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.zero td{color:#8a94a6}
tr.total th,tr.total td{border-top:2px solid #4a5568;font-weight:600}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
.verdict{margin:0 0 12px;padding:10px 14px;border:1px solid;border-left-width:8px;font-weight:600}
.verdict.ok{border-color:#2f855a;background:#f0fff4}
.verdict.warn{border-color:#c05621;background:#fffaf0}
.note{color:#4a5568;font-size:12.5px;margin:6px 0}
.empty{margin:8px 0;padding:20px;border:1px dashed #a0aec0;text-align:center;color:#4a5568}
ul.checks{list-style:none;padding:0;margin:6px 0}
li.check{padding:2px 0}
li.check.good strong{color:#2f855a}
li.check.bad{color:#c53030;font-weight:600}
figure.chart{margin:8px 0}
svg{display:block;width:100%;height:auto}
svg text{font-size:12px;fill:#4a5568}
svg .grid{stroke:#e2e8f0}
svg .axis{stroke:#4a5568}
svg .fine{fill:#3182ce}
svg .bad{fill:#dd6b20}
svg .mark{stroke:#1a202c;stroke-dasharray:4 3}
svg .mark-label{fill:#1a202c;font-weight:600}
.key{display:inline-block;width:10px;height:10px;vertical-align:baseline;margin:0 2px 0 6px}
.key.fine{background:#3182ce}
.key.bad{background:#dd6b20}
table.signoff td{height:34px}
footer{margin-top:30px}
@page{margin:14mm}
@media print{
  body{color:#000;background:#fff;font-size:10.5pt}
  main{max-width:none;padding:0}
  th{background:#fff}
  th,td{border-color:#000}
  tr.zero td,.note,.empty,svg text{color:#000;fill:#000}
  .verdict,.verdict.ok,.verdict.warn{background:#fff;border-color:#000}
  li.check.good strong,li.check.bad{color:#000}
  svg .grid{stroke:#bbb}
  svg .axis,svg .mark{stroke:#000}
  svg .fine{fill:#888}
  svg .bad{fill:#000}
  .key{-webkit-print-color-adjust:exact;print-color-adjust:exact}
  .key.fine{background:#888}
  .key.bad{background:#000}
  h2,h3{break-after:avoid}
  /* Short sections move whole to the next page; the long tables may split, between rows only. */
  section,tr,figure.chart,.verdict,ul.checks{break-inside:avoid}
  #settings{break-inside:auto}
  th,td{padding:3px 5px}
  thead{display:table-header-group}
  table.narrow{width:100%}
}
"""
