"""The report's figures, read from a run folder's summary.json, results.csv and rejects.csv in bounded memory."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...errors import OutputError
from ...vocab import OK_STATUSES, Status
from .fmt import MAX_SHOWN_CHARS

__all__ = [
    "FINE",
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
    "Throughput",
    "nice_step",
    "read_rejects",
    "read_results",
    "read_summary",
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
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400,
)  # fmt: skip
# Statuses that count as a row ending well, for the errors table and the throughput chart's colours.
FINE: frozenset[str] = OK_STATUSES | {Status.DRY_RUN}


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


def read_results(path: Path, run: Run) -> Results:
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
    # Rows per status, in the order statuses first appear: the tally gets each status once, with its count.
    per_status: dict[str, int] = {}
    for fields in records:
        if not fields:
            continue
        rows += 1
        user_id, status = _cell(fields, i_user), _cell(fields, i_status)
        per_status[status] = per_status.get(status, 0) + 1
        raw_tries = _cell(fields, i_attempts)
        tries = (int(raw_tries) if raw_tries.isdigit() else _int_or_none(raw_tries)) or 0
        attempts += tries
        attempts_per_row[min(tries, MAX_ATTEMPTS_KEY)] += 1
        if tries > 0:
            sent_rows += 1
        if tries > 1:
            multi += 1
        fine = status in FINE
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
        raw_ms = _cell(fields, i_latency)
        if raw_ms:  # empty for every row that sent nothing
            ms = _int_or_none(raw_ms)
            if ms is not None and ms >= 0:
                latency.add(ms)
        if timeline is not None:
            timeline.add(_cell(fields, i_finished), fine)
    for status, count in per_status.items():
        statuses.add(status, "", "", "", count=count)
    return Results(
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


def read_rejects(path: Path) -> Kinds:
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


class _Timeline:
    def __init__(self, start: datetime, end: datetime) -> None:
        span = max(0.0, (end - start).total_seconds())
        self._start = start
        self._size = _bucket_size(span)
        count = max(1, math.ceil(span / self._size - 1e-9))
        self._fine = [0] * count
        self._bad = [0] * count
        self._untimed = 0
        self._last_text, self._last_index = "", 0

    @classmethod
    def for_run(cls, run: Run) -> _Timeline | None:
        start, end = _parse_time(run.started_at), _parse_time(run.finished_at)
        if start is None or end is None:
            return None
        return cls(start, end)

    def add(self, finished_at: str, fine: bool) -> None:
        if finished_at == self._last_text:
            index = self._last_index  # rows settled together share a timestamp: parse it once
        else:
            moment = _parse_time(finished_at)
            if moment is None:
                self._untimed += 1
                return
            index = int((moment - self._start).total_seconds() // self._size)
            index = min(max(index, 0), len(self._fine) - 1)
            self._last_text, self._last_index = finished_at, index
        if fine:
            self._fine[index] += 1
        else:
            self._bad[index] += 1

    def result(self) -> Throughput:
        return Throughput(
            start=self._start,
            bucket_s=self._size,
            buckets=tuple(zip(self._fine, self._bad, strict=True)),
            untimed=self._untimed,
        )
