"""The report's figures: a run's summary.json, and its results.csv and rejects.csv tallied in bounded memory.

The CSVs' figures are tallied row by row (`RunTally`), by the run's output as it writes each row or by
`read_tally` reading a finished run's files back: one tally, so the report a run writes for itself and the one
`backfill report` writes later from its files say the same.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ...errors import OutputError
from ...vocab import FINE_STATUSES
from .fmt import MAX_SHOWN_CHARS

__all__ = [
    "LATENCY_BINS",
    "MAX_ATTEMPTS_KEY",
    "MAX_BUCKETS",
    "MAX_KINDS",
    "Bin",
    "Kind",
    "Kinds",
    "Latency",
    "Results",
    "Run",
    "RunTally",
    "Throughput",
    "nice_step",
    "read_summary",
    "read_tally",
]

MAX_BUCKETS = 60  # throughput bars: more than this is unreadable on a printed page
LATENCY_BINS = 30
TOP = 10
EXAMPLES = 3
# A file with millions of distinct error texts must not grow the tally without end; beyond this many kinds,
# rows are still counted, as not itemised.
MAX_KINDS = 10_000
MAX_ATTEMPTS_KEY = 100
REDACTED = "***"
# Settings are redacted before summary.json is written; this is a second lock on the same door.
_SECRET_KEY = re.compile(r"api[_-]?key|secret|token|passw|credential|private", re.IGNORECASE)
_BUCKET_SIZES_S = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1,
    2,
    5,
    10,
    15,
    30,
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10800,
    21600,
    43200,
    86400,
)


# --- values ---


@dataclass(frozen=True, slots=True, kw_only=True)
class Kind:
    """One error code or reject reason: how many rows, which statuses, a message and a few user_ids."""

    label: str
    count: int
    statuses: tuple[tuple[str, int], ...]
    message: str
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Kinds:
    top: tuple[Kind, ...]
    rows: int
    kinds: int
    untracked_rows: int  # rows whose kind arrived after `limit` kinds were already held
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Bin:
    low: float
    high: float
    count: int
    overflow: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    rows: int
    mean_ms: float
    min_ms: int
    p50_ms: int
    p90_ms: int
    p99_ms: int
    max_ms: int
    bins: tuple[Bin, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    start: datetime
    bucket_s: float
    buckets: tuple[tuple[int, int], ...]  # (rows fine, rows not fine) finished in each bucket
    untimed: int  # rows with no readable finished_at


@dataclass(frozen=True, slots=True, kw_only=True)
class Results:
    rows: int
    counts: tuple[tuple[str, int], ...]
    sent_rows: int
    attempts: int
    multi_attempt_rows: int
    attempts_per_row: tuple[tuple[int, int], ...]
    errors: Kinds
    latency: Latency | None
    has_latency_column: bool
    throughput: Throughput | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Run:
    run_id: str
    env: str
    base_url: str
    manifest: str
    manifest_sha256: str
    ledger: str
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


# --- reading ---


def read_summary(path: Path) -> Run:
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
    return Run(
        run_id=_text(raw, "run_id"),
        env=_text(raw, "env"),
        base_url=_text(raw, "base_url"),
        manifest=_text(raw, "manifest"),
        manifest_sha256=_text(raw, "manifest_sha256"),
        ledger=_text(raw, "ledger"),
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


class RunTally:
    """The figures of a run's results.csv and rejects.csv, added a row at a time, in bounded memory.

    The run's output feeds it each row as it writes it, so a run's report needs no second pass over a file of
    a million rows; `read_tally` feeds it a finished run's files. `clean` is applied to every text the tally
    keeps (error texts, messages, example user_ids): the secrets scrubber when the rows come from the run, as
    the files' lines pass through it; nothing when they come from the files, already scrubbed.
    """

    def __init__(self, clean: Callable[[str], str] | None = None) -> None:
        self._clean = clean
        self._errors = _KindTally()
        self._reasons = _KindTally()
        self._latency = _LatencyTally()
        self._attempts_per_row: Counter[int] = Counter()
        self._moments = _Moments()
        # Rows per status, in the order statuses first appear.
        self._per_status: dict[str, int] = {}
        self._rows = self._sent_rows = self._attempts = self._multi = 0
        self.has_latency_column = True

    def result(
        self,
        *,
        user_id: str,
        status: str,
        attempts: int,
        finished_at: str,
        latency_ms: int | None,
        http_status: str,
        result_code: str,
        result_text: str,
        error: str,
    ) -> None:
        """One results.csv row, as its columns read (`http_status` as written: digits, or empty)."""
        self._rows += 1
        self._per_status[status] = self._per_status.get(status, 0) + 1
        self._attempts += attempts
        self._attempts_per_row[min(attempts, MAX_ATTEMPTS_KEY)] += 1
        if attempts > 0:
            self._sent_rows += 1
            if attempts > 1:
                self._multi += 1
        fine = status in FINE_STATUSES
        if not fine:
            clean = self._clean
            if clean is not None:
                user_id, result_text, error = clean(user_id), clean(result_text), clean(error)
                result_code, http_status = clean(result_code), clean(http_status)
            label = (
                result_code
                or (f"HTTP {http_status}" if http_status else "")
                or error
                or ("not sent" if not attempts else "no answer")
            )
            self._errors.add(label, user_id, error or result_text, status)
        if latency_ms is not None and latency_ms >= 0:
            self._latency.add(latency_ms)
        self._moments.add(finished_at, fine)

    def settled(self, status: str, count: int, finished_at: str) -> None:
        """`count` results.csv rows of one status that ends well, none sent in this run, all finished at
        `finished_at`: what `result` would make of each, in one step (a resume settles rows by the chunk)."""
        if status not in FINE_STATUSES:
            raise ValueError(
                f"{status!r} rows each need their own line in the errors table: add them one by one"
            )
        if not count:
            return
        self._rows += count
        self._per_status[status] = self._per_status.get(status, 0) + count
        self._attempts_per_row[0] += count
        self._moments.add(finished_at, True, count)

    def reject(self, *, line: str, user_id: str, reason: str, message: str) -> None:
        """One rejects.csv row, as its columns read."""
        clean = self._clean
        if clean is not None:
            user_id, reason, message = clean(user_id), clean(reason), clean(message)
        self._reasons.add(reason, f"line {line}: {user_id}" if line else user_id, message, "")

    def results(self, run: Run) -> Results:
        statuses = _KindTally()
        for status, count in self._per_status.items():
            statuses.add(status, "", "", "", count=count)
        return Results(
            rows=self._rows,
            counts=tuple((k.label, k.count) for k in statuses.top(MAX_KINDS).top),
            sent_rows=self._sent_rows,
            attempts=self._attempts,
            multi_attempt_rows=self._multi,
            attempts_per_row=tuple(sorted(self._attempts_per_row.items())),
            errors=self._errors.top(TOP),
            latency=self._latency.result(),
            has_latency_column=self.has_latency_column,
            throughput=self._moments.throughput(run),
        )

    def rejects(self) -> Kinds:
        return self._reasons.top(TOP)


def read_tally(results: Path, rejects: Path) -> RunTally:
    """A finished run's results.csv and rejects.csv, read back one record at a time into a tally."""
    tally = RunTally()
    records = _open_csv(results)
    col = _columns(results, next(records, None), ("user_id", "status"))
    i_user, i_status = col["user_id"], col["status"]
    i_http, i_code, i_text = col.get("http_status"), col.get("result_code"), col.get("result_text")
    i_error, i_attempts = col.get("error"), col.get("attempts")
    i_finished, i_latency = col.get("finished_at"), col.get("latency_ms")
    tally.has_latency_column = i_latency is not None
    for fields in records:
        if not fields:
            continue
        raw_tries = _cell(fields, i_attempts)
        raw_ms = _cell(fields, i_latency)  # empty for every row that sent nothing
        tally.result(
            user_id=_cell(fields, i_user),
            status=_cell(fields, i_status),
            attempts=(int(raw_tries) if raw_tries.isdigit() else _int_or_none(raw_tries)) or 0,
            finished_at=_cell(fields, i_finished),
            latency_ms=_int_or_none(raw_ms) if raw_ms else None,
            http_status=_cell(fields, i_http),
            result_code=_cell(fields, i_code),
            result_text=_cell(fields, i_text),
            error=_cell(fields, i_error),
        )
    records = _open_csv(rejects)
    col = _columns(rejects, next(records, None), ("line", "user_id", "reason"))
    i_line, i_user, i_reason, i_message = col["line"], col["user_id"], col["reason"], col.get("message")
    for fields in records:
        if fields:
            tally.reject(
                line=_cell(fields, i_line),
                user_id=_cell(fields, i_user),
                reason=_cell(fields, i_reason),
                message=_cell(fields, i_message),
            )
    return tally


def _int_or_none(raw: str) -> int | None:
    if not raw:
        return None  # most cells of a resume's rows: no exception raised and caught a million times over
    try:
        return int(raw)
    except ValueError:
        return None


# --- bounded tallies ---


class _KindTally:
    """Rows per kind with a message and a few examples, holding at most MAX_KINDS kinds."""

    def __init__(self) -> None:
        self._limit = MAX_KINDS
        self._counts: dict[str, int] = {}
        self._statuses: dict[str, Counter[str]] = {}
        self._messages: dict[str, str] = {}
        self._examples: dict[str, list[str]] = {}
        self._untracked = 0

    def add(self, label: str, example: str, message: str, status: str, *, count: int = 1) -> None:
        """`count` rows of kind `label` (status, example and message, if given, count once per call)."""
        # Kinds are told apart by their start: a long error text must not be held whole, 10,000 times over.
        label = label[: MAX_SHOWN_CHARS + 1]
        if label not in self._counts:
            if len(self._counts) >= self._limit:
                self._untracked += count
                return
            self._counts[label] = 0
            self._statuses[label] = Counter()
            # Only the start is kept: the page shows no more, and a huge field must not be held.
            self._messages[label] = message[: MAX_SHOWN_CHARS + 1]
            self._examples[label] = []
        self._counts[label] += count
        if status:
            self._statuses[label][status] += count
        examples = self._examples[label]
        if example and len(examples) < EXAMPLES:
            examples.append(example[: MAX_SHOWN_CHARS + 1])

    def top(self, n: int) -> Kinds:
        ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return Kinds(
            top=tuple(
                Kind(
                    label=label,
                    count=count,
                    statuses=tuple(sorted(self._statuses[label].items(), key=lambda kv: (-kv[1], kv[0]))),
                    message=self._messages[label],
                    examples=tuple(self._examples[label]),
                )
                for label, count in ranked
            ),
            rows=sum(self._counts.values()) + self._untracked,
            kinds=len(self._counts),
            untracked_rows=self._untracked,
            limit=self._limit,
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

    def result(self) -> Latency | None:
        if not self._rows or self._min is None:
            return None
        ordered = sorted(self._counts.items())
        p50, p90, p99 = (_percentile(ordered, self._rows, p) for p in (50, 90, 99))
        return Latency(
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


def _latency_bins(ordered: list[tuple[int, int]], low: int, p99: int, high: int) -> tuple[Bin, ...]:
    # A few timeouts would squash every other bar into one; past 3x p99 they get a bar of their own.
    tail = p99 > 0 and high > 3 * p99
    top = p99 if tail else high
    width = max(1, int(nice_step((top - low) / LATENCY_BINS))) if top > low else 1
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
    out = [Bin(low=start + i * width, high=start + (i + 1) * width, count=n) for i, n in enumerate(bins)]
    if tail:
        edge = start + count * width
        out.append(Bin(low=edge, high=high, count=overflow, overflow=True))
    return tuple(out)


def nice_step(raw: float) -> float:
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Ticks holding rows before they are merged two by two. Merging starts only once rows span more than this many
# ticks, and a bucket is at least 1/60 of the run: so a tick stays under 1/100 of a bucket.
_MOMENTS_MAX = 12_000


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // _MICROSECOND


class _Moments:
    """When rows finished, fine or not, held before the run's start and end are known, in bounded memory.

    Rows are counted per tick: a millisecond (finished_at's precision) while no more than _MOMENTS_MAX ticks hold
    rows, then twice as long each time they would be more. A tick is placed whole in the throughput bucket its
    start lies in: a row is drawn one bucket early only if it finished within a tick after a bucket's edge, and
    a tick stays under 1/100 of a bucket. A run whose rows span no more than 12 s (a resume's, say) is exact.
    """

    def __init__(self) -> None:
        self._tick_us = 1000
        self._ticks: dict[int, list[int]] = {}  # tick -> [rows fine, rows not fine]
        self._untimed = 0
        # The last finished_at seen and its tick's counts: rows settled together share a timestamp.
        self._last_text: str | None = None
        self._last_tick = [0, 0]

    def add(self, finished_at: str, fine: bool, count: int = 1) -> None:
        if finished_at == self._last_text:
            tick = self._last_tick
        else:
            moment = _parse_time(finished_at)
            if moment is None:
                self._untimed += count
                return
            key = _micros(moment) // self._tick_us
            found = self._ticks.get(key)
            if found is None:
                found = self._ticks[key] = [0, 0]
                if len(self._ticks) > _MOMENTS_MAX:
                    self._coarsen()
                    found = self._ticks[key // 2]
            self._last_text, self._last_tick = finished_at, found
            tick = found
        tick[0 if fine else 1] += count

    def _coarsen(self) -> None:
        self._tick_us *= 2
        merged: dict[int, list[int]] = {}
        for key, (fine, bad) in self._ticks.items():
            into = merged.get(key // 2)
            if into is None:
                merged[key // 2] = [fine, bad]
            else:
                into[0] += fine
                into[1] += bad
        self._ticks = merged
        self._last_text = None  # its counts were merged into another list

    def throughput(self, run: Run) -> Throughput | None:
        """Rows per bucket from the run's start to its end (rows outside them in the first or last bucket)."""
        start, end = _parse_time(run.started_at), _parse_time(run.finished_at)
        if start is None or end is None:
            return None
        span = max(0.0, (end - start).total_seconds())
        size = _bucket_size(span)
        count = max(1, math.ceil(span / size - 1e-9))
        size_us, start_us, tick_us = round(size * 1_000_000), _micros(start), self._tick_us
        fine, bad = [0] * count, [0] * count
        for key, (f, b) in self._ticks.items():
            index = min(max((key * tick_us - start_us) // size_us, 0), count - 1)
            fine[index] += f
            bad[index] += b
        buckets = tuple(zip(fine, bad, strict=True))
        return Throughput(start=start, bucket_s=size, buckets=buckets, untimed=self._untimed)
