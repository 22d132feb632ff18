"""report.html for a finished run: the figures a person needs to sign off a migration, in one offline file."""

from __future__ import annotations

import os
import re
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

from ...errors import OutputError
from ..private import make_private_dirs
from .data import RunTally, read_summary, read_tally
from .migration import LedgerView, build_migration
from .page import build_page
from .render import MIGRATION_KIND, RUN_KIND, render_migration, render_page

__all__ = ["REPORT_NAME", "RunTally", "write_migration_report", "write_report"]

REPORT_NAME = "report.html"
# The mark each report carries in its <head> (render.generator): what tells a page the tool wrote, and may write
# again, from someone else's file at the same path.
_MARK = re.compile(rb'<meta name="generator" content="backfill [^"<>;]*; ([a-z ]+)">')
_MARK_WITHIN = 4096  # bytes from the start: the mark is near the top of <head>


def write_report(run_dir: Path, *, overwrite: bool = False, tally: RunTally | None = None) -> Path:
    """Write report.html into a finished run folder and return its path.

    `tally`: the figures of the run's results.csv and rejects.csv as the run tallied them while writing them
    (what reading them back gives), so a run's own report costs no second pass over its files; without it the
    files are read. A report.html this tool wrote is rendered again, since the run's files lose nothing by it;
    any other file there is replaced only when `overwrite`. Raises OutputError when the folder isn't a finished
    run or a file can't be read or written.
    """
    target = run_dir / REPORT_NAME
    replace = _may_replace(target, RUN_KIND, overwrite=overwrite)
    run = read_summary(run_dir / "summary.json")
    if tally is None:
        tally = read_tally(run_dir / "results.csv", run_dir / "rejects.csv")
    page = render_page(build_page(run, tally.results(run), tally.rejects(), datetime.now(UTC)))
    _write_private(target, page, overwrite=replace)
    return target


def write_migration_report(
    view: LedgerView, *, out_dir: Path, output: Path | None = None, overwrite: bool = False
) -> Path:
    """Write the report across a whole ledger: to `output`, else a new migration-report-<UTC>.html in `out_dir`.

    Owner-only, like every output. An existing `output` that is a migration report this tool wrote is replaced
    (naming a fixed file asks for the current report there); any other file only when `overwrite`.
    """
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"  # as a run folder is named
    target = output or out_dir / f"migration-report-{stamp}.html"
    try:
        make_private_dirs(target.parent)
    except OSError as exc:
        raise OutputError(f"can't create the folder {exc.filename}: {exc.strerror}") from exc
    replace = _may_replace(target, MIGRATION_KIND, overwrite=overwrite)
    _write_private(target, render_migration(build_migration(view, now)), overwrite=replace)
    return target


def _may_replace(target: Path, kind: str, *, overwrite: bool) -> bool:
    """Whether writing `target` replaces what is there; OutputError when something is there that must stay."""
    if overwrite or _written_by_us(target, kind):
        return True
    if os.path.lexists(target):
        raise OutputError(
            f"{target} already exists and is not a {kind} written by backfill; pass --overwrite to replace it"
        )
    return False


def _written_by_us(path: Path, kind: str) -> bool:
    """Whether `path` is a regular file (not a link to one) holding this tool's mark for a report of `kind`."""
    try:
        # O_NOFOLLOW: a symlink is nobody's report; O_NONBLOCK: a FIFO planted there must not hang the check.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        mark = _MARK.search(os.read(fd, _MARK_WITHIN))
    finally:
        os.close(fd)
    return mark is not None and mark.group(1).decode() == kind


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
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"can't create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(page)
    except OSError as exc:
        path.unlink(missing_ok=True)  # ours, O_EXCL made it: half a report must not pass for a whole one
        raise OutputError(f"can't write {path}: {exc.strerror}") from exc
