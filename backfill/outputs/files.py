"""A run's folder: results.csv, rejects.csv, summary.json and report.html, owner-only, each whole once it exists.

Every file is written under a temporary name and renamed into place only when complete (flushed and synced),
so a file that exists is whole, and summary.json is renamed after the CSVs: its presence means the run's
outputs are complete. report.html, read by people and derived from the others, follows it. Every line passes
through the secrets scrubber on its way out.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import operator
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ..errors import OutputError
from ..redact import scrub
from ..run.records import RejectRow, ResultRow, SkippedRow, Summary
from ..vocab import Status
from .private import make_private_dirs
from .report import write_report
from .report.data import RunTally

RESULT_FIELDS = (
    "user_id",
    "status",
    "http_status",
    "result_code",
    "result_text",
    "smile_job_id",
    "job_id",
    "attempts",
    "signature_ok",
    "error",
    "finished_at",
    "latency_ms",
    "normalized",
)
REJECT_FIELDS = ("line", "user_id", "reason", "message")
_SIGNATURE_OK_AT = RESULT_FIELDS.index("signature_ok")
_SMILE_JOB_ID_AT, _JOB_ID_AT = RESULT_FIELDS.index("smile_job_id"), RESULT_FIELDS.index("job_id")


class _Scrubbed:
    """A text handle that scrubs secrets from everything written through it."""

    def __init__(self, handle: IO[str]) -> None:
        self.handle = handle

    def write(self, text: str) -> int:
        return self.handle.write(scrub(text))


class _AtomicFile:
    """A new owner-only file, written under a temporary name in the same folder, renamed into place on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutputError(f"can't create {path}: {exc.strerror}") from exc
        self.raw = os.fdopen(fd, "w", encoding="utf-8", newline="")
        self.handle = _Scrubbed(self.raw)

    def commit(self) -> None:
        try:
            self.raw.flush()
            os.fsync(self.raw.fileno())
            self.raw.close()
            if self.path.exists():
                raise FileExistsError(f"{self.path} exists")
            os.rename(self._tmp, self.path)
        except OSError as exc:
            self.abandon()
            raise OutputError(f"can't finish writing {self.path}: {exc.strerror or exc}") from exc

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.raw.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


def new_run_dir(root: Path, suffix: str = "") -> tuple[str, Path]:
    now = datetime.now(UTC)
    # Milliseconds in the name, so folders sort in the order runs started even when runs are quick.
    run_id = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + uuid.uuid4().hex[:6]
    folder = root / (run_id + suffix)
    try:
        make_private_dirs(root)
        folder.mkdir(mode=0o700)  # never an earlier run's folder
    except OSError as exc:
        raise OutputError(
            f"can't create the output folder {folder}: {exc.strerror}. Choose a writable folder with --out"
        ) from exc
    return run_id, folder


_RESULT_VALUES = operator.attrgetter(*RESULT_FIELDS)


# What makes the csv writer (QUOTE_MINIMAL, "\r\n") quote a field: a delimiter, a quote or a line break. Searched
# for as characters in a whole chunk, and by the pattern made of them in a single row.
_QUOTED_CHARS = ',"\r\n'
_NEEDS_QUOTES = re.compile(f"[{re.escape(_QUOTED_CHARS)}]")


def _csv_line(values: Sequence[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue()


def csv_value(value: Any) -> Any:
    """A value as every CSV the tool writes spells it: true/false (as JSON does, not Python's True), None empty.

    One spelling for results.csv and exports alike, so a script or a spreadsheet filter written for one file
    works on the other.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _result_values(row: ResultRow) -> Sequence[Any]:
    # One C call for the twelve fields; the csv module writes None as an empty field.
    values: tuple[Any, ...] = _RESULT_VALUES(row)
    if row.signature_ok is None:
        return values
    listed = list(values)
    listed[_SIGNATURE_OK_AT] = csv_value(row.signature_ok)
    return listed


def write_rejects(root: Path, rejects: Iterable[RejectRow]) -> Path:
    """rejects.csv alone, in a folder of its own, for `backfill validate`."""
    _, folder = new_run_dir(root, "-validate")
    out = _AtomicFile(folder / "rejects.csv")
    try:
        writer = csv.writer(out.handle)
        writer.writerow(REJECT_FIELDS)
        writer.writerows([r.line, r.user_id, r.reason, r.message] for r in rejects)
    except OSError as exc:
        out.abandon()
        raise OutputError(f"can't write {out.path}: {exc.strerror}") from exc
    out.commit()
    return out.path


class RunOutput:
    """The run's folder and its files: the engine's Sink. Every row written here goes to exactly one file.

    Each row is also added to the report's tally as it is written, so report.html is made at `close` without
    reading the CSVs back.
    """

    def __init__(self, root: Path) -> None:
        self.run_id, self.dir = new_run_dir(root)
        self._results = _AtomicFile(self.dir / "results.csv")
        self._rejects = _AtomicFile(self.dir / "rejects.csv")
        self._results_csv = csv.writer(self._results.handle)
        self._rejects_csv = csv.writer(self._rejects.handle)
        self._write(self._results_csv, list(RESULT_FIELDS))
        self._write(self._rejects_csv, list(REJECT_FIELDS))
        self._tally = RunTally(clean=scrub)  # the texts it keeps, scrubbed as the files' lines are

    @property
    def tally(self) -> RunTally:
        """The report's figures of every row written so far."""
        return self._tally

    def result(self, row: ResultRow) -> None:
        self._write(self._results_csv, _result_values(row))
        self._tally.result(
            user_id=row.user_id,
            status=row.status,
            attempts=row.attempts,
            finished_at=row.finished_at,
            latency_ms=row.latency_ms,
            http_status="" if row.http_status is None else str(row.http_status),
            result_code=row.result_code,
            result_text=row.result_text,
            error=row.error,
        )

    def reject(self, row: RejectRow) -> None:
        self._write(self._rejects_csv, [row.line, row.user_id, row.reason, row.message])
        self._tally.reject(line=str(row.line), user_id=row.user_id, reason=row.reason, message=row.message)

    def skipped(self, rows: Sequence[SkippedRow], finished_at: str) -> None:
        """The lines `result` would write for these skipped rows, byte for byte, without a ResultRow each.

        Only the user_id and the two job ids differ between rows with the same result code and message: the
        rest is formatted by the csv writer once, around them, and they are quoted by it whenever they need it.
        """
        parts: dict[tuple[str, str], tuple[str, str]] = {}

        def around(code: str, message: str) -> tuple[str, str]:
            """The fields between the user_id and the job ids, and those after them, each from its comma."""
            made = parts.get((code, message))
            if made is None:
                values = _result_values(
                    ResultRow(
                        user_id="",
                        status=Status.SKIPPED,
                        result_code=code,
                        error=message,
                        finished_at=finished_at,
                    )
                )
                made = parts[(code, message)] = (
                    _csv_line(values[:_SMILE_JOB_ID_AT]).rstrip("\r\n"),
                    _csv_line(["", *values[_JOB_ID_AT + 1 :]]),
                )
            return made

        n = len(rows)
        uids = [r[0] for r in rows]
        smile_job_ids = [r[2] for r in rows]
        job_ids = [r[3] for r in rows]
        varying = "".join(uids) + "".join(smile_job_ids) + "".join(job_ids)
        if (
            n
            and [r[1] for r in rows].count(rows[0][1]) == n
            and [r[4] for r in rows].count(rows[0][4]) == n
            and not any(c in varying for c in _QUOTED_CHARS)
        ):
            # A finished job's chunk: one result code and message, and no value the csv writer would quote (each
            # searched for once in the chunk's values, not by a regular expression a row: ~0.3 us of 1.1 a row).
            head, tail = around(rows[0][1], rows[0][4])
            text = "".join(
                [
                    f"{uid}{head},{smile},{job}{tail}"
                    for uid, smile, job in zip(uids, smile_job_ids, job_ids, strict=True)
                ]
            )
        else:
            lines = []
            quoted = _NEEDS_QUOTES.search
            for user_id, code, smile_job_id, job_id, message in rows:
                head, tail = around(code, message)
                if user_id and quoted(user_id + smile_job_id + job_id) is None:  # one scan: nearly every row
                    lines.append(f"{user_id}{head},{smile_job_id},{job_id}{tail}")
                else:
                    # Formatted as a first field, not as a line of its own (where an empty one is quoted).
                    uid = _csv_line([user_id, ""]).rstrip("\r\n")[:-1]
                    lines.append(uid + head + _csv_line(["", smile_job_id, job_id]).rstrip("\r\n") + tail)
            text = "".join(lines)
        try:
            # The chunk through the scrubber at once: every secret within a line is masked as line by line.
            self._results.handle.write(text)
        except OSError as exc:
            raise OutputError(f"can't write to {self.dir}: {exc.strerror}") from exc
        self._tally.settled(Status.SKIPPED, len(rows), finished_at)

    def _write(self, writer: Any, values: Sequence[Any]) -> None:
        try:
            writer.writerow(values)
        except OSError as exc:
            raise OutputError(f"can't write to {self.dir}: {exc.strerror}") from exc

    def close(self, summary: Summary) -> Path:
        """Commit the CSVs, then summary.json, so its presence means the run's outputs are whole; then the report.

        A report that can't be written is logged, never an error: the run's outcome stands in the other files.
        """
        try:
            self._results.commit()
            self._rejects.commit()
        except OutputError:
            self.abandon()
            raise
        out = _AtomicFile(self.dir / "summary.json")
        try:
            json.dump(asdict(summary), out.handle, indent=2, sort_keys=True)
            out.handle.write("\n")
        except OSError as exc:
            out.abandon()
            raise OutputError(f"can't write {out.path}: {exc.strerror}") from exc
        out.commit()
        self._write_report()
        return out.path

    def _write_report(self) -> None:
        try:
            write_report(self.dir, tally=self._tally)
        except Exception as error:
            logging.getLogger("backfill").warning(
                "report.html was not written: %s", error, extra={"event": "report_failed", "fields": {}}
            )

    def close_incomplete(self) -> bool:
        """A run that failed: keep the rows written so far (each file whole), and no summary.json, whose absence
        says the run did not finish. If even that can't be written, leave nothing under a final name (False)."""
        try:
            self._results.commit()
            self._rejects.commit()
        except OutputError:
            self.abandon()
            return False
        return True

    def abandon(self) -> None:
        self._results.abandon()
        self._rejects.abandon()


def write_retry_manifest(root: Path, columns: Mapping[str, str], rows: Iterable[Sequence[str]]) -> Path:
    """A manifest of ledger rows for `backfill retry`, kept beside the runs as a record of what was re-sent."""
    try:
        make_private_dirs(root)
    except OSError as exc:
        raise OutputError(f"can't create the output folder {root}: {exc.strerror}") from exc
    path = root / (datetime.now(UTC).strftime("retry-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6] + ".csv")
    out = _AtomicFile(path)
    try:
        writer = csv.writer(out.handle)
        writer.writerow([columns["user_id"], columns["user_created_at"], columns["image_path"]])
        writer.writerows(rows)
    except OSError as exc:
        out.abandon()
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc
    out.commit()
    return path


def write_export(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], fmt: str, handle: IO[str]) -> int:
    """Ledger rows as CSV (manifest columns first, so it can be fixed and fed back) or JSON lines."""
    count = 0
    out = _Scrubbed(handle)
    try:
        if fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=list(fields))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: csv_value(v) for k, v in row.items()})
                count += 1
        else:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    except BrokenPipeError:
        raise  # the reader went away (`export | head`): not a failure to report; the CLI exits quietly
    except OSError as exc:
        raise OutputError(f"can't write the export: {exc.strerror}") from exc
    return count


def export_to(path: Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str], fmt: str) -> int:
    """An export into a new owner-only file; never overwrites (an export is a record)."""
    if path.exists():
        raise OutputError(f"{path} exists: an export never overwrites; choose a new --out")
    try:
        make_private_dirs(path.parent)
    except OSError as exc:
        raise OutputError(f"can't create the folder {path.parent}: {exc.strerror}") from exc
    out = _AtomicFile(path)
    try:
        count = write_export(rows, fields, fmt, out.raw)
    except BaseException:
        out.abandon()
        raise
    out.commit()
    return count
