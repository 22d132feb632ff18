"""A run's outputs: its own folder with results.csv, rejects.csv and summary.json, owner-readable only."""

from __future__ import annotations

import csv
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import OutputError
from ..ledger.sqlite import ALREADY_ENROLLED, ENROLLED, FAILED, ID_CONFLICT, PENDING, RETRY_EXHAUSTED, UNKNOWN

RESULT_FIELDS = (
    "user_id", "status", "http_status", "result_code", "result_text", "smile_job_id", "job_id",
    "attempts", "signature_ok", "error", "finished_at", "latency_ms",
)  # fmt: skip
REJECT_FIELDS = ("line", "user_id", "reason", "message")
_SIGNATURE_OK_AT = RESULT_FIELDS.index("signature_ok")

# A row's status in a run: the checkpoint's final states, plus these that exist only in a run's outputs.
SKIPPED = "skipped"  # already enrolled in the checkpoint: not sent again
DRY_RUN = "dry_run"  # would be sent
REJECTED = "rejected"
__all__ = [
    "ALREADY_ENROLLED", "DRY_RUN", "ENROLLED", "FAILED", "ID_CONFLICT", "OK_STATUSES", "PENDING", "REJECTED",
    "RETRY_EXHAUSTED", "SKIPPED", "UNKNOWN", "ResultRow", "RunOutput", "Summary",
]  # fmt: skip
OK_STATUSES = frozenset({ENROLLED, ALREADY_ENROLLED, SKIPPED})


@dataclass(frozen=True, slots=True)
class ResultRow:
    user_id: str
    status: str
    http_status: int | None = None
    result_code: str = ""
    result_text: str = ""
    smile_job_id: str = ""
    job_id: str = ""
    attempts: int = 0
    signature_ok: bool | None = None
    error: str = ""
    finished_at: str = ""
    latency_ms: int | None = None  # the last attempt's round trip


@dataclass(frozen=True)
class Summary:
    run_id: str
    out_dir: str
    manifest: str
    env: str
    base_url: str
    started_at: str
    finished_at: str
    duration_s: float
    total_rows: int
    counts: dict[str, int]
    rejected: int
    sent: int
    attempts: int
    new_rows: int  # rows the checkpoint had never seen: in a nightly run, the day's new users
    retries: int  # attempts beyond each row's first
    not_reached: int
    rows_per_s: float
    exit_code: int
    stop_reason: str = ""
    dry_run: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


def _open_private(path: Path) -> IO[str]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"can't create {path}: {exc.strerror}") from exc
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


def _new_run_dir(root: Path, suffix: str = "") -> tuple[str, Path]:
    now = datetime.now(UTC)
    # Milliseconds in the name, so folders sort in the order runs started even when runs are quick.
    run_id = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + uuid.uuid4().hex[:6]
    folder = root / (run_id + suffix)
    try:
        root.mkdir(parents=True, exist_ok=True)
        # exist_ok=False: a run never writes into an earlier run's folder.
        folder.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(
            f"can't create the output folder {folder}: {exc.strerror}. Choose a writable folder with --out"
        ) from exc
    return run_id, folder


class RejectLike(Protocol):
    @property
    def line(self) -> int: ...
    @property
    def user_id(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...


def write_rejects(root: Path, rejects: Iterable[RejectLike]) -> Path:
    """rejects.csv alone, in a folder of its own, for `backfill validate`."""
    _, folder = _new_run_dir(root, "-validate")
    path = folder / "rejects.csv"
    try:
        with _open_private(path) as handle:
            writer = csv.writer(handle)
            writer.writerow(REJECT_FIELDS)
            writer.writerows([r.line, r.user_id, r.reason, r.message] for r in rejects)
    except OSError as exc:
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc
    return path


class RunOutput:
    """Creates the run's folder and writes its files. Every row written here goes to exactly one file."""

    def __init__(self, root: Path) -> None:
        self.run_id, self.dir = _new_run_dir(root)
        self._results_file = _open_private(self.dir / "results.csv")
        self._rejects_file = _open_private(self.dir / "rejects.csv")
        self._results = csv.writer(self._results_file)
        self._rejects = csv.writer(self._rejects_file)
        self._results.writerow(RESULT_FIELDS)
        self._rejects.writerow(REJECT_FIELDS)
        self.counts: Counter[str] = Counter()

    def result(self, row: ResultRow) -> None:
        # Fields read directly: dataclasses.asdict deep-copies, and it showed in profiles of big resumes.
        values: list[Any] = [getattr(row, k) for k in RESULT_FIELDS]
        if row.signature_ok is not None:
            values[_SIGNATURE_OK_AT] = "true" if row.signature_ok else "false"
        self._write(self._results, ["" if v is None else v for v in values])
        self.counts[row.status] += 1

    def reject(self, line: int, user_id: str, reason: str, message: str) -> None:
        self._write(self._rejects, [line, user_id, reason, message])
        self.counts[REJECTED] += 1

    def _write(self, writer: Any, values: list[Any]) -> None:
        try:
            writer.writerow(values)
        except OSError as exc:
            raise OutputError(f"can't write to {self.dir}: {exc.strerror}") from exc

    def flush(self) -> None:
        for handle in (self._results_file, self._rejects_file):
            handle.flush()

    def close(self, summary: Summary) -> Path:
        """Close the CSVs and write summary.json last, so its presence means the run's outputs are whole."""
        path = self.dir / "summary.json"
        try:
            # Buffered rows reach the disk here: a full disk shows up at close as often as at write.
            for handle in (self._results_file, self._rejects_file):
                handle.close()
            with _open_private(path) as out:
                json.dump(asdict(summary), out, indent=2, sort_keys=True)
                out.write("\n")
        except OSError as exc:
            raise OutputError(f"can't finish writing {self.dir}: {exc.strerror}. The checkpoint is intact; "
                              "free some space and re-run") from exc  # fmt: skip
        return path


def write_retry_manifest(root: Path, columns: Mapping[str, str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """A manifest of checkpoint rows for `backfill retry`, kept beside the runs as a record of what was re-sent."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"can't create the output folder {root}: {exc.strerror}") from exc
    path = root / (datetime.now(UTC).strftime("retry-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6] + ".csv")
    try:
        with _open_private(path) as handle:
            writer = csv.writer(handle)
            writer.writerow([columns["user_id"], columns["user_created_at"], columns["image_path"]])
            writer.writerows([r["user_id"], r["user_created_at"], r["image_path"]] for r in rows)
    except OSError as exc:
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc
    return path


def write_export(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], fmt: str, handle: IO[str]) -> int:
    """Checkpoint rows as CSV (manifest columns first, so it can be fixed and fed back) or JSON lines."""
    count = 0
    try:
        if fmt == "csv":
            writer = csv.DictWriter(handle, fieldnames=list(fields))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
                count += 1
        else:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    except OSError as exc:
        raise OutputError(f"can't write the export: {exc.strerror}") from exc
    return count


def export_to(path: Path, rows: Iterable[Mapping[str, Any]], fields: Sequence[str], fmt: str) -> int:
    """An export into a new owner-only file; never overwrites (an export is a record)."""
    try:
        with _open_private(path) as handle:
            return write_export(rows, fields, fmt, handle)
    except OSError as exc:
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc
