"""The `backfill` command: parse flags, resolve settings, make one library call, map errors to exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import importlib.resources
import json
import logging
import os
import re
import resource
import secrets
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import compose
from ..config import Settings, early_log_format, flag_for
from ..errors import ConfigError
from ..ledger import LedgerStatus, RunRecord
from ..ledger.sqlite import FoundLedger
from ..outputs import files as rs
from ..redact import scrub
from ..run.records import Summary
from ..run.stops import Leaving
from ..version import __version__
from ..vocab import EXIT_FIXES, RETRYABLE_STATES, TRANSIENT_STATES, ExitCode, Status
from ._common import (
    LOCAL_PARTNER_ID,
    config_option,
    guard,
    ledger_options,
    load_settings,
    log_options,
    manifest_options,
    out_option,
    setting_options,
)
from .logs import Said, json_lines, say, setup_logging, start
from .progress import TqdmProgress
from .sandbox import sandbox
from .watch import WATCH_EVERY, Screen, every

# What `config show` says when no partner ID is set, so no default ledger can be named (not "null").
NO_LEDGER = "(none: set SMILE_PARTNER_ID, or name one with --ledger, BACKFILL_LEDGER or ledger: in the file)"

# The sample data ships in the package (backfill/demo), so an ordinary install finds it from any folder.
DEMO_PACKAGE = "backfill.demo"


def manifest_arg(value: str) -> Path | str:
    """A manifest's local path, or its object-storage URL kept as written (a Path would fold its "//")."""
    from ..images.urls import is_url

    return value if is_url(value) else Path(value)


lease_option = setting_options("lease")
read_concurrency_option = setting_options("read_concurrency")
yes_option = click.option(
    "--yes",
    is_flag=True,
    help="Send to production without asking (asked only when stdin and stderr are a terminal).",
)
metrics_option = setting_options("metrics_addr")
# Where to send: the API, and the ledger that says what was sent.
api_and_ledger_options = setting_options("env", "base_url", "ca_bundle", "ledger")


class _Commands(click.Group):
    """backfill's commands: a usage error (an unknown flag, a value click refuses) is a JSON line too when the
    format asked for is JSON, as far as the words given say it (the settings were never read)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[_ARGS] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            args = ctx.meta.get(_ARGS, [])
            config_file = _given("--config", args)
            path = None if config_file is None else Path(config_file)
            start(early_log_format(path, os.environ, _given("--log-format", args)))
            if not json_lines():
                raise  # click says it, as it always has
            where = error.ctx.command_path if error.ctx is not None else "backfill"
            say(
                logging.ERROR,
                Said.FATAL_ERROR,
                error.format_message(),
                exit_code=error.exit_code,
                error=type(error).__name__,
                fix=f"see {where} --help",
            )
            sys.exit(error.exit_code)


_ARGS = "backfill.args"  # the command line's words, kept for a usage error's format


def _given(flag: str, args: list[str]) -> str | None:
    """The value of `flag` among the command line's words (the last one wins, as click has it), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.partition("=")[2]
    return found


@click.group(cls=_Commands)
@click.version_option(__version__, prog_name="backfill")
def main() -> None:
    """Enroll existing users into Smile ID from a manifest CSV, resumably and at most once per user_id.

    Credentials come from SMILE_PARTNER_ID and SMILE_API_KEY (never a flag).
    """
    no_core_dumps()


# prctl(2)'s option that makes a process (un)dumpable, from <linux/prctl.h>.
PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    """Photos and the API key sit in this process's memory, so it never leaves a core dump: RLIMIT_CORE is 0
    (hard too), and on Linux the process is not dumpable either, because a core_pattern that pipes to a handler
    (systemd-coredump, apport) is not bound by RLIMIT_CORE. Not dumpable also keeps other processes of the same
    OS user from attaching to it or reading its memory and environment (root still can)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


@main.command()
@click.argument("manifest")
@config_option
@out_option
@manifest_options
@read_concurrency_option
@guard
def validate(manifest: str, config_file: Path | None, **flags: Any) -> None:
    """Validate MANIFEST (a path, or an s3://, gs://, az:// or https:// URL) only: write rejects.csv and print
    counts. Sends nothing."""
    settings = load_settings(config_file, flags=flags, need_credentials=False)
    found = compose.validation(settings, manifest_arg(manifest))
    valid, rejects = found.valid, found.rejects
    path = rs.write_rejects(settings.out, rejects)
    click.echo(f"{valid} valid, {len(rejects)} rejected; rejects: {path}")
    counts: dict[str, int] = {}
    for reject in rejects:
        counts[reject.reason] = counts.get(reject.reason, 0) + 1
    for reason, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        click.echo(f"  {reason}: {count}")
    if found.shared_photos:
        allowed = settings.max_ids_per_photo
        largest = ", the largest" if found.shared_photos > len(found.shared) else ""
        click.echo(
            f"{found.shared_photos} photo(s) named by more than {allowed} user_id{'s' if allowed > 1 else ''} "
            f"(max_ids_per_photo), every row rejected as shared_photo{largest}:"
        )
        for group in found.shared:
            click.echo(f"  {group.described()}")
    sys.exit(0 if not rejects else 1)


@main.command()
@click.argument("manifest")
@config_option
@api_and_ledger_options
@manifest_options
@read_concurrency_option
@guard
def check(manifest: str, config_file: Path | None, **flags: Any) -> None:
    """Preflight for `run` with the same settings: credentials (every problem at once), ledger, API host, TLS,
    clock, a sample of MANIFEST's photos, and whether the ledger pins a sampled user_id to another photo. Sends
    nothing that could enroll anyone (one GET of the API root); writes nothing."""
    from .. import preflight
    from ..errors import ConfigError

    try:
        # A credential that can't be used is one of the checks, beside the others, not the end of the check.
        settings = load_settings(config_file, flags=flags, need_credentials=False, defer_credentials=True)
    except ConfigError as error:
        click.echo(scrub(f"problem  settings: {error.key} (from {error.source}): {error.problem}"))
        click.echo(scrub(f"         fix: {error.fix}"))
        sys.exit(error.exit_code)
    checks = preflight.run_checks(settings, manifest_arg(manifest))
    for c in checks:
        click.echo(scrub(f"{'ok     ' if c.ok else 'problem'}  {c.name}: {c.detail}"))
        if not c.ok and c.fix:
            click.echo(scrub(f"         fix: {c.fix}"))
    code = preflight.exit_code(checks)
    problems = sum(not c.ok for c in checks)
    click.echo("all checks passed" if code == 0 else f"{problems} problem(s): exit {code}")
    sys.exit(code)


@main.command()
@click.argument("manifest")
@config_option
@setting_options(
    "env", "base_url", "concurrency", "rate", "max_attempts", "timeout", "fail_threshold", "ledger"
)
@setting_options("ca_bundle")
@lease_option
@out_option
@setting_options("dry_run", "limit", "max_duration", "stop_timeout")
@metrics_option
@manifest_options
@read_concurrency_option
@log_options
@setting_options("progress", "operator")
@yes_option
@guard
def run(manifest: str, config_file: Path | None, yes: bool, **flags: Any) -> None:
    """Send every valid row of MANIFEST not already enrolled; resume where an earlier run stopped.

    Against production from a terminal, says what it will send and asks first (--yes: don't ask).
    """
    settings = load_settings(config_file, flags=flags)
    _run(settings, manifest_arg(manifest), confirm=_production_question(settings, yes=yes))


def _run(settings: Settings, manifest: Path | str, *, confirm: compose.Confirm | None) -> NoReturn:
    bar = _bar(settings)
    setup_logging(settings, bar.enabled)
    try:
        summary = compose.run_blocking(
            settings, manifest, progress=bar, on_interrupt=_acknowledge, confirm=confirm, on_leave=_left
        )
    finally:
        bar.close()
    _report(summary)
    sys.exit(summary.exit_code)


def _bar(settings: Settings) -> TqdmProgress:
    """The progress bar, on a terminal unless --no-progress; never among JSON lines, which a bar would tear."""
    return TqdmProgress(settings.progress and settings.log_format == "text")


def interactive() -> bool:
    """Whether someone is there to answer: stdin and stderr both terminals. Not so under cron, CI, a pipe."""
    return sys.stdin.isatty() and sys.stderr.isatty()


def _production_question(settings: Settings, *, yes: bool) -> compose.Confirm | None:
    """The question before a production run, or None when there is none to ask: --yes, a dry run (it sends
    nothing), another API, or nobody at a terminal (a job must never wait for an answer)."""
    if yes or settings.dry_run or not settings.production or not interactive():
        return None
    return _ask_production


def _ask_production(outbound: compose.Outbound) -> bool:
    """Once, on stderr: anything but y or yes (an empty line, end of input) is no."""
    rows = f"{outbound.rows:,} row{'' if outbound.rows == 1 else 's'}"
    limit = f"  limit:    at most {outbound.limit:,} sent (--limit)\n" if outbound.limit is not None else ""
    click.echo(
        "About to send to Smile ID's production API:\n"
        f"  rows:     {rows} in {outbound.source}\n{limit}"
        f"  partner:  {outbound.partner_id}\n"
        f"  endpoint: {outbound.url}\n"
        f"  ledger:   {outbound.ledger}",
        err=True,
    )
    click.echo("Send to production? [y/N] ", nl=False, err=True)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def _acknowledge(signum: int, in_flight: int, wait_s: float) -> None:
    """The first signal, said at once: the stop itself waits for the answers in flight (up to --stop-timeout)."""
    name = signal.Signals(signum).name
    again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
    requests = "1 request" if in_flight == 1 else f"{in_flight} requests"
    said = f"stopping: {requests} in flight, answers awaited {wait_s:g}s at most (--stop-timeout), {again} to leave now"
    say(
        logging.WARNING,
        Said.STOP_REQUESTED,
        f"\n{said}",
        message=said,
        signal=name,
        in_flight=in_flight,
        stop_timeout_s=wait_s,
    )


def _left(leaving: Leaving) -> None:
    """The second signal: one line of what was left and how to resume, as the process exits without outputs."""
    folder = Path(leaving.out_dir)
    parts = sorted(p.name for p in folder.glob(".*.part")) if folder.is_dir() else []
    requests = "1 request" if leaving.in_flight == 1 else f"{leaving.in_flight} requests"
    # Partial: rows still in the writers' buffers are lost with the process, and the ledger has them all.
    kept = f"partial results in {', '.join(parts)}" if parts else "no results"
    said = (
        f"left now: {requests} in flight, in doubt until a re-run settles them; the run folder {folder} holds "
        f"{kept} (no summary.json); re-run the same command to resume"
    )
    say(
        logging.WARNING,
        Said.LEFT_NOW,
        f"\n{said}",
        message=said,
        signal=signal.Signals(leaving.signum).name,
        in_flight=leaving.in_flight,
        out_dir=str(folder),
        partial=parts,
    )


@main.command()
@config_option
@click.option(
    "--status",
    "states",
    default=",".join(sorted(TRANSIENT_STATES)),
    show_default=True,
    help="Which rows to re-send: any of pending, sending, retry_exhausted, unknown, failed.",
)
@api_and_ledger_options
@lease_option
@out_option
@setting_options("concurrency", "rate", "max_attempts", "timeout", "max_duration", "stop_timeout")
@metrics_option
@read_concurrency_option
@setting_options("normalize")
@log_options
@setting_options("progress", "operator")
@yes_option
@guard
def retry(config_file: Path | None, states: str, yes: bool, **flags: Any) -> None:
    """Re-send rows straight from the ledger, without the manifest (same guarantees as `run`).

    Transient failures by default; name `failed` to re-send permanent failures too (after fixing their images).
    Against production from a terminal, says what it will send and asks first (--yes: don't ask).
    """
    chosen = compose.parse_status_names(states, allowed=RETRYABLE_STATES, what="retried")
    settings = load_settings(config_file, flags=flags)
    bar = _bar(settings)
    setup_logging(settings, bar.enabled)
    settings = _reading(settings, sending=True)
    try:
        summary = compose.retry(
            settings,
            chosen,
            progress=bar,
            on_interrupt=_acknowledge,
            confirm=_production_question(settings, yes=yes),
            on_leave=_left,
        )
    finally:
        bar.close()
    if summary is None:
        said = "nothing to retry: no ledger row is in " + ", ".join(chosen)
        if json_lines():
            say(logging.INFO, Said.NOTHING_TO_RETRY, said, states=[str(s) for s in chosen])
        else:
            click.echo(said)
        return
    _report(summary)
    sys.exit(summary.exit_code)


@main.command()
@config_option
@ledger_options()
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (with --watch: one line a report)."
)
@click.option(
    "--watch",
    type=click.FloatRange(min=0, min_open=True),
    is_flag=False,
    flag_value=WATCH_EVERY,
    metavar="[SECONDS]",
    help=f"Report again every SECONDS (default {WATCH_EVERY:g}) until Ctrl-C.",
)
@click.option("--watch-rounds", type=click.IntRange(min=1), hidden=True)  # a test's bound on the rounds
@guard
def status(
    config_file: Path | None, as_json: bool, watch: float | None, watch_rounds: int | None, **flags: Any
) -> None:
    """Counts per state, the last runs, and what is waiting for a retry, from the ledger."""
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))

    def draw() -> str:
        report = compose.status(settings)  # the ledger opened afresh each round: what the run wrote since
        if as_json:
            return json.dumps(asdict(report), indent=None if watch else 2, default=str)
        return "\n".join(_status_lines(report))

    if watch is None:
        click.echo(draw())
        return
    # JSON lines stay parseable: no screen to clear, no separator between them.
    screen = Screen(write=click.echo, tty=sys.stdout.isatty(), plain=as_json)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends, not a failure
        every(draw, watch, screen, rounds=watch_rounds)


_ERASE_YES = click.option(
    "--yes", is_flag=True, help="Forget without asking (required when no one is at a terminal to answer)."
)
# Not the dry_run setting's option: that one is read from a config file and the environment too, and an
# erasure's count-only pass is asked for on its own command line.
_ERASE_DRY = click.option(
    "--dry-run", "count_only", is_flag=True, help="Count what would be forgotten; change nothing."
)


@main.command()
@config_option
@ledger_options()
@click.argument("user_ids", nargs=-1, metavar="[USER_ID]...")
@click.option(
    "--from",
    "from_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A file of user_ids to forget, one a line (blank lines ignored).",
)
@_ERASE_DRY
@_ERASE_YES
@log_options
@setting_options("operator")
@guard
def forget(
    config_file: Path | None,
    user_ids: tuple[str, ...],
    from_file: Path | None,
    count_only: bool,
    yes: bool,
    **flags: Any,
) -> None:
    """Remove users' personal data from the ledger (an erasure request), leaving a tombstone each.

    The tombstone (the ID's keyed hash, its state and dates) keeps the ID from ever being sent again: a manifest
    naming it later reports it `forgotten`. Recorded in the audit trail (backfill status). Can't be undone.
    """
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
    # Each ID as the manifest rules would read it, and one that no manifest could hold refuses the whole request
    # before anything is removed: an erasure that silently skips a mangled ID would pass for one done.
    named = [("the command line", uid.strip()) for uid in user_ids]
    if from_file is not None:
        try:
            # utf-8-sig: a file saved as "UTF-8 with BOM" (Excel, Notepad) must not hide its first ID behind it.
            text = from_file.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                "--from", str(from_file), f"can't be read ({exc})", "name a readable text file"
            ) from exc
        named += [
            (f"line {n} of {from_file}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    if not named:
        raise ConfigError(
            "USER_ID", "the command line", "no user_id is named", "name them: USER_ID... or --from FILE"
        )
    pattern = re.compile(settings.user_id_pattern)
    for where, uid in named:
        if not pattern.fullmatch(uid):
            raise ConfigError(
                "USER_ID",
                where,
                f"{uid[:80]!r} is not a user_id (user_id_pattern {settings.user_id_pattern}), so no ledger "
                "holds it; nothing was forgotten",
                "name one user_id a line (a file of user_ids, not a manifest), or set user_id_pattern as the "
                "runs had it",
            )
    ids = [uid for _, uid in named]
    erased = compose.forget(
        settings, ids, dry_run=count_only, confirm=_erasure_question(yes=yes or count_only)
    )
    _tell_erased(erased)


@main.command()
@config_option
@ledger_options()
@click.option(
    "--before",
    required=True,
    metavar="DATE",
    help="Forget every row finished (enrolled, already_enrolled, id_conflict, failed) before DATE (YYYY-MM-DD, UTC).",
)
@_ERASE_DRY
@_ERASE_YES
@log_options
@setting_options("operator")
@guard
def purge(config_file: Path | None, before: str, count_only: bool, yes: bool, **flags: Any) -> None:
    """Forget every row finished before a date (a retention period), as `forget` does each one."""
    try:
        day = datetime.date.fromisoformat(before)
    except ValueError:
        raise ConfigError(
            "--before", "the command line", f"{before!r} is not a date", "write it as YYYY-MM-DD"
        ) from None
    if day > datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1):
        raise ConfigError(
            "--before", "the command line", f"{before} is in the future", "name a date no later than tomorrow"
        )
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
    erased = compose.purge(
        settings, day.isoformat(), dry_run=count_only, confirm=_erasure_question(yes=yes or count_only)
    )
    _tell_erased(erased)


def _erasure_question(*, yes: bool) -> compose.ConfirmErasure | None:
    """The question before an erasure; with no one at a terminal and no --yes, a refusal: it can't be undone."""
    if yes:
        return None
    if not interactive():
        return _refuse_unasked
    return _ask_erasure


def _refuse_unasked(erasure: compose.Erasure) -> bool:
    raise ConfigError(
        "--yes",
        "the command line",
        f"{erasure.command} would forget {erasure.found.count:,} rows of {erasure.ledger} for good, and no one is "
        "at a terminal to confirm",
        "pass --yes (or --dry-run to count them first)",
    )


def _ask_erasure(erasure: compose.Erasure) -> bool:
    """Once, on stderr: anything but y or yes is no."""
    found = erasure.found
    states = ", ".join(f"{n:,} {state}" for state, n in found.forgotten.items())
    click.echo(
        f"About to forget {found.count:,} row{'' if found.count == 1 else 's'} ({states}) for good:\n"
        f"  ledger:  {erasure.ledger}\n"
        f"  command: {erasure.command}\n"
        "Their user_created_at, image reference, photo fingerprint and result text are removed; a keyed hash of "
        "each user_id stays, so it is never sent again.",
        err=True,
    )
    click.echo("Forget them? [y/N] ", nl=False, err=True)
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def _tell_erased(erased: compose.Erased) -> None:
    done = erased.done
    note = compose.erasure_note(done)
    said = (
        f"dry run: would {compose.erasure_note(done, dry=True)}" if erased.dry_run else note
    ) + f" in {erased.ledger}"
    if erased.run_id is not None:
        said += f" (audit trail: run {erased.run_id})"
    if json_lines():
        say(
            logging.WARNING if done.refused else logging.INFO,
            Said.FORGOTTEN,
            said,
            run_id=erased.run_id,
            dry_run=erased.dry_run,
            forgotten=done.forgotten,
            already=done.already,
            never_held=done.unknown,
            refused=len(done.refused),
            exit_code=erased.exit_code,
        )
    else:
        click.echo(said)
        if erased.never_held:
            more = done.unknown - len(erased.never_held)
            click.echo(
                f"  never in the ledger (nothing to forget): {', '.join(erased.never_held)}"
                + (f" and {more:,} more" if more > 0 else "")
                + ". Check that they are spelled as the manifests had them",
                err=True,
            )
        for uid in done.refused:
            click.echo(
                f"  not forgotten: {uid} (an attempt is in flight: backfill retry, then forget it)", err=True
            )
    sys.exit(erased.exit_code)


@main.command("find-user")
@config_option
@ledger_options()
@click.argument("user_ids", nargs=-1, required=True, metavar="USER_ID...")
@guard
def find_user(config_file: Path | None, user_ids: tuple[str, ...], **flags: Any) -> None:
    """Each USER_ID's name in log lines written with log_user_ids: hashed (keyed by the ledger's secret).

    A user forgotten on request (backfill forget) is found too: a third column says when, and what it was.
    """
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
    for user_id, hashed, tombstone in compose.find_users(settings, user_ids):
        if tombstone is None:
            click.echo(f"{hashed}\t{user_id}")
        else:  # a third column, only then: a reader of the first two reads on as before
            gone = f"forgotten {tombstone.forgotten_at} (was {tombstone.state}; run {tombstone.forgotten_by})"
            click.echo(f"{hashed}\t{user_id}\t{gone}")


@main.command("sample-photos")
@config_option
@ledger_options()
@guard
def sample_photos(config_file: Path | None, **flags: Any) -> None:
    """Keep the sample of each photo the ledger pinned before it kept samples (ledgers from before schema 5).

    A run's shared-photo census finds the IDs sent from other manifests by their photos' samples. Rows sent
    before the ledger kept them have none, so a new ID naming one of their photos isn't found. This reads the
    head and tail of each such photo where it was sent from and keeps its sample (keyed, like the pin), where
    the photo is still the version sent. Run it once, when no run is using the ledger.
    """
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
    done = compose.sample_photos(settings)
    left = done.changed + done.unreadable
    click.echo(
        f"{done.sampled:,} of {done.unsampled:,} photos pinned without a sample are sampled now"
        + (
            f"; {done.changed:,} have changed since they were sent and {done.unreadable:,} can't be read where "
            "they were sent from: a photo of those IDs shared with a new ID is found only when a manifest line "
            "names the ID"
            if left
            else ""
        )
    )


def _status_lines(report: LedgerStatus) -> list[str]:
    b = report.binding
    lines = [f"ledger {report.location} (partner {b.partner_id}, {b.endpoint})"]
    lines.append(_table(["state", "rows"], [[k, v] for k, v in report.counts.items()] or [["(empty)", 0]]))
    lines.append(f"waiting for a retry: {report.waiting_for_retry}")
    if report.forgotten:
        lines.append(f"forgotten on request: {report.forgotten:,} (kept as tombstones: never sent again)")
    if report.oldest_unfinished:
        o = report.oldest_unfinished
        last = f"{o.result_code or '-'} {o.result_text or ''}".strip()
        lines.append(
            f"oldest unfinished: {o.user_id} ({o.state}, {o.attempts} attempts, "
            f"first tried {o.first_attempt_at}, last answer {last})"
        )
    runs = [
        [
            r.run_id,
            r.started_at,
            r.finished_at or _unfinished(report, r),
            f"{r.operator or '-'}@{r.host or '-'}",
            r.api_key_id or "-",
            short_path(r.manifest or ""),
            r.rows if r.rows is not None else "",
            r.exit_code if r.exit_code is not None else "",
        ]
        for r in report.runs
    ]
    lines.append("last runs:")
    lines.append(
        _table(
            ["run", "started", "finished", "by", "api key", "manifest", "rows", "exit"],
            runs or [["(none)", "", "", "", "", "", "", ""]],
        )
    )
    for r in report.runs:
        if r.note:  # as the run last saw itself: one line each, too long for a column
            lines.append(f"{r.run_id}: {r.note}")
    if report.fleet_rate is not None or report.processes:
        rate = (
            ""
            if report.fleet_rate is None
            else f"; rate {report.fleet_rate:.3g}/s of {report.fleet_ceiling:g}/s"
        )
        lines.append(f"fleet: {len(report.processes)} process(es) live{rate}")
        live = [
            [p.run_id, p.host, p.pid, p.started_at, p.claimed, f"{p.heartbeat_age_s:g}s ago"]
            for p in report.processes
        ]
        if live:
            lines.append(_table(["run", "host", "pid", "started", "rows claimed", "heartbeat"], live))
        for q in report.queues:
            lines.append(
                f"manifest {q.manifest_sha256[:12]} ({q.path}, loaded {q.loaded_at}): {q.finished:,} of "
                f"{q.rows:,} rows finished, {q.claimed:,} claimed now"
            )
    return lines


@main.command()
@config_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@guard
def ledgers(config_file: Path | None, fmt: str) -> None:
    """Every ledger in the default folder: partner, endpoint, rows by state, last run, path. Writes nothing.

    A command that reads a ledger (status, export, report, retry) with none named uses the default one for the
    partner and --env; `--env`, `--base-url` or `--ledger` picks another. A PostgreSQL ledger is named, not here.
    """
    settings = load_settings(config_file, need_credentials=False)
    found = compose.ledgers(settings)
    folder = settings.ledger_folder
    if fmt == "json":
        listed = [
            {
                "path": f.path,
                "partner_id": f.binding.partner_id if f.binding else None,
                "endpoint": f.binding.endpoint if f.binding else None,
                "rows": f.rows,
                "counts": f.counts,
                "last_run": asdict(f.last_run) if f.last_run else None,
                "running": f.running,
                "problem": f.problem or None,
            }
            for f in found
        ]
        click.echo(json.dumps({"folder": str(folder), "ledgers": listed}, indent=2))
        return
    if not found:
        click.echo(
            f"no ledgers in {folder}: a run makes one there for its partner and API, unless --ledger names one"
        )
        return
    click.echo(f"ledgers in {folder}:")
    click.echo(
        _table(
            ["partner", "endpoint", "rows", "by state", "last run", "path"],
            [
                [
                    f.binding.partner_id if f.binding else "?",
                    (f.binding.endpoint or "?") if f.binding else "?",
                    f"{f.rows:,}" if not f.problem else "",
                    f.problem or ", ".join(f"{n:,} {state}" for state, n in f.counts.items()) or "(empty)",
                    _last_run(f),
                    f.path,
                ]
                for f in found
            ],
        )
    )


def _last_run(found: FoundLedger) -> str:
    """When its last run started, and how it ended: its exit code, still running, or died unfinished."""
    run = found.last_run
    if run is None:
        return "(none)"
    if run.exit_code is not None:
        return f"{run.started_at} (exit {run.exit_code})"
    return f"{run.started_at} ({'running' if found.running else 'died'})"


def _reading(settings: Settings, *, sending: bool = False) -> Settings:
    """The settings naming the ledger a command reads (`sending`: retries): the default one, or, when it doesn't
    exist and no flag picks one, the only one for this partner, said on stderr (compose.default_or_only)."""
    chosen, found = compose.default_or_only(settings, sending=sending)
    if found is not None and found.binding is not None:
        doing = f"retrying from it, to {chosen.base_url} (--env {chosen.env})" if sending else "reading it"
        said = (
            f"no ledger at {settings.ledger_path()}; the only one for partner {found.binding.partner_id} is "
            f"{found.path} ({found.binding.endpoint}): {doing}"
        )
        say(
            logging.INFO,
            Said.LEDGER_CHOSEN,
            f"backfill: {said}",
            message=said,
            path=found.path,
            partner_id=found.binding.partner_id,
            endpoint=found.binding.endpoint,
        )
    return chosen


def short_path(path: str, width: int = 40) -> str:
    """A manifest's path as a column shows it: whole when short, else its end (the file and its folders), whole
    folders where they fit. `status --json` has every path in full."""
    if len(path) <= width:
        return path
    tail = path[len(path) - width + 1 :]
    cut = tail.find("/")
    return "…" + (tail[cut:] if 0 <= cut < len(tail) - 1 else tail)


def _unfinished(report: LedgerStatus, run: RunRecord) -> str:
    """A run with no finish time: still going if a live process holds it (SQLite: the newest such, with its lock
    held now, as there is one writer at a time; PostgreSQL: its heartbeat is recent); otherwise it died
    (SIGKILL, power loss) without finishing. Re-running resumes it either way."""
    if report.fleet_rate is not None or report.processes:
        return "(running)" if any(p.run_id == run.run_id for p in report.processes) else "died"
    newest = next((r for r in report.runs if not r.finished_at), None)
    return "(running)" if report.writer_alive and run is newest else "died"


@main.command()
@config_option
@ledger_options()
@click.option("--status", "states", help="Only rows in these states (comma-separated), e.g. failed.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv", show_default=True)
@click.option(
    "--out", "out_path", type=click.Path(path_type=Path, dir_okay=False), help="File (default: stdout)."
)
@guard
def export(
    config_file: Path | None, states: str | None, fmt: str, out_path: Path | None, **flags: Any
) -> None:
    """Everything the ledger knows, across runs, as one file; CSV starts with the manifest's columns."""
    chosen = compose.parse_status_names(states) if states is not None else None
    settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
    rows = compose.export_rows(settings, chosen)  # opens the ledger now: an error comes before any output
    fields = compose.export_fields(settings)
    if out_path is None:
        rs.write_export(rows, fields, fmt, sys.stdout)
        sys.stdout.flush()  # here, where a reader gone away (`| head`) is a quiet exit, not at interpreter exit
        return
    count = rs.export_to(out_path, rows, fields, fmt)
    say(
        logging.INFO,
        Said.EXPORT_WRITTEN,
        f"{count} rows written to {out_path}",
        rows=count,
        path=str(out_path),
    )


@main.command()
@click.argument("run_dir", required=False, type=click.Path(path_type=Path, file_okay=False, exists=True))
@config_option
@ledger_options("Without RUN_DIR: report on this ledger, across every run.")
@out_option
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The migration report's file (default: migration-report-<UTC>.html in --out).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a file at the report's path that backfill didn't write (its own report is rewritten "
    "without it).",
)
@guard
def report(
    run_dir: Path | None, config_file: Path | None, output: Path | None, overwrite: bool, **flags: Any
) -> None:
    """Write (or rewrite) RUN_DIR/report.html from the run's summary.json and CSVs.

    Without RUN_DIR: one report across the whole ledger (--ledger, or the default one as `status` finds it):
    every user_id's final state, every run with its manifest's SHA-256, and the open items.
    """
    if run_dir is None:
        settings = _reading(load_settings(config_file, flags=flags, need_credentials=False))
        click.echo(str(compose.migration_report(settings, output, overwrite=overwrite)))
        return
    given = [flag_for(k) for k, v in flags.items() if v is not None]
    if given or output is not None or config_file is not None:
        raise ConfigError(
            "RUN_DIR",
            "the command line",
            f"a run folder's report takes none of {', '.join(given) or '--output'}",
            "give RUN_DIR alone for a run's report.html, or leave it out for the whole ledger's report",
        )
    from ..outputs.report import write_report

    click.echo(str(write_report(run_dir, overwrite=overwrite)))


@main.group()
def config() -> None:
    """Inspect settings."""


@config.command("show")
@config_option
@setting_options("env")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@guard
def config_show(config_file: Path | None, as_json: bool, **flags: Any) -> None:
    """The resolved settings and where each value came from; secrets redacted."""
    settings = load_settings(config_file, flags=flags, need_credentials=False)
    values = settings.redacted()
    # The ledger the run would really use, not the unset flag: the one setting a user most needs to find.
    ledger = settings.ledger_location()
    values["ledger"] = ledger if ledger is not None or as_json else NO_LEDGER
    sources = {k: settings.sources.get(k, "default") for k in values}
    # Not a setting, but what a run would use for base_url: the environment's proxy, never its credentials.
    route = compose.api_route(settings)
    values["proxy"] = route.proxy.shown if route.proxy is not None else None if as_json else "(none: direct)"
    sources["proxy"] = route.proxy.source if route.proxy is not None else route.direct
    if settings.ca_bundle is None and not as_json:
        values["ca_bundle"] = f"(none: {route.trusts})"
    if as_json:
        shown = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in values.items()}
        click.echo(json.dumps({k: {"value": v, "source": sources[k]} for k, v in shown.items()}, indent=2))
        return
    click.echo(_table(["setting", "value", "from"], [[k, _cell(v), sources[k]] for k, v in values.items()]))


def _cell(value: object) -> str:
    """A value as a table shows it: text as it is, unless a tab or a space (a delimiter) would vanish in it."""
    plain = isinstance(value, str) and value.isprintable() and value == value.strip()
    return str(value) if plain else json.dumps(value, default=str)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _report(summary: Summary) -> None:
    """The run's summary: lines on stdout (the reason it stopped on stderr), or one JSON line among the log's."""
    if json_lines():
        _report_line(summary)
        return
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items()) or "nothing to do"
    click.echo(f"{summary.total_rows} rows: {counts}")
    skipped = summary.counts.get(Status.SKIPPED, 0)
    forgotten = summary.counts.get(Status.FORGOTTEN, 0)
    gone = f", forgotten on request (not sent): {forgotten}" if forgotten else ""
    click.echo(
        f"new: {summary.new_rows}, skipped (already done): {skipped}{gone}, rejected: {summary.rejected}"
    )
    in_doubt = summary.counts.get(Status.UNKNOWN, 0)
    if in_doubt:
        click.echo(
            f"{in_doubt} rows in doubt (unknown): a request may have reached the server; run the same command "
            "again (or `backfill retry`) to settle them"
        )
    if summary.not_reached:
        click.echo(
            f"{summary.not_reached} rows not reached in this run: run the same command again to continue"
        )
    if summary.stop_reason:
        click.echo(f"stopped: {summary.stop_reason}", err=True)
    click.echo(f"results: {summary.out_dir}")
    report = Path(summary.out_dir) / "report.html"
    if report.exists():
        click.echo(f"report:  {report}")


def _report_line(summary: Summary) -> None:
    """The summary as one JSON line, at the level a log pipeline alerts on: error when something must be fixed."""
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts.items()) or "nothing to do"
    report = Path(summary.out_dir) / "report.html"
    code = summary.exit_code
    said = f"{summary.total_rows} rows: {counts}; results: {summary.out_dir}"
    if summary.stop_reason:
        said += f"; stopped: {summary.stop_reason}"
    if code in (ExitCode.OK, ExitCode.ROWS_LEFT):
        level = logging.INFO
    elif code in (ExitCode.SIGINT, ExitCode.SIGTERM):
        level = logging.WARNING  # stopped as asked: every attempt recorded, resumable
    else:
        level = logging.ERROR  # stopped by something to fix (2, 3, 4) or a bug (70)
    say(
        level,
        Said.RUN_SUMMARY,
        said,
        run_id=summary.run_id,
        exit_code=code,
        total_rows=summary.total_rows,
        counts=summary.counts,
        new_rows=summary.new_rows,
        skipped=summary.counts.get(Status.SKIPPED, 0),
        rejected=summary.rejected,
        in_doubt=summary.counts.get(Status.UNKNOWN, 0),
        not_reached=summary.not_reached,
        stop_reason=summary.stop_reason or None,
        out_dir=summary.out_dir,
        report=str(report) if report.exists() else None,
        fix=EXIT_FIXES[code] if code != ExitCode.OK else None,
    )


@main.command()
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@guard
def demo(no_progress: bool) -> None:
    """Run the bundled sample data through an in-process sandbox, with a throwaway ledger and output."""
    from ..sandbox import start_sandbox

    work = Path(tempfile.mkdtemp(prefix="backfill-demo-"))
    api_key = secrets.token_urlsafe(24)
    bar = TqdmProgress(not no_progress)

    async def go() -> Summary:
        server = await start_sandbox(LOCAL_PARTNER_ID, api_key)
        try:
            settings = load_settings(
                None,
                environ={"SMILE_PARTNER_ID": LOCAL_PARTNER_ID, "SMILE_API_KEY": api_key},
                flags={
                    "env": "local",
                    "base_url": server.base_url,
                    "ledger": work / "ledger.sqlite",
                    "out": work / "out",
                    "rate": 50,
                    "concurrency": 4,
                },
            )
            # A real folder: the manifest's relative image paths resolve against it. (Installed packages are
            # files on disk; a zipped one would be extracted for the run.)
            with importlib.resources.as_file(importlib.resources.files(DEMO_PACKAGE)) as folder:
                return await compose.run(settings, folder / "manifest.csv", progress=bar)
        finally:
            await server.stop()

    try:
        summary = asyncio.run(go())
    finally:
        bar.close()
    _report(summary)
    click.echo("(the sample manifest has rows that are rejected on purpose: see rejects.csv)")
    sys.exit(0 if summary.exit_code in (0, 1) else summary.exit_code)


main.add_command(sandbox)
