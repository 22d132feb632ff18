"""The nightly backfill as a Dagster job that runs in-process: the run's exit code makes its step succeed, be
skipped, or fail (and whether Dagster may retry it). deploy/README.md has the table.

    dagster job execute -f deploy/dagster/nightly.py -j nightly_backfill -c run_config.yaml

The credentials come from the environment of the Dagster process (SMILE_PARTNER_ID, SMILE_API_KEY, and PGPASSWORD
for a PostgreSQL ledger), as for the CLI; the settings are the config file's keys, in the op's run config.
"""

import json
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import dagster as dg

import backfill
from backfill import ExitCode


class Outcome(StrEnum):
    SUCCESS = "success"
    SKIP = "skip"
    FAIL = "fail"


def outcome(exit_code: int) -> Outcome:
    """What an exit code of `backfill run` means to an orchestrator."""
    if exit_code in (ExitCode.OK, ExitCode.ROWS_LEFT):
        # 1: rejected rows, or rows left (a stop, retries spent): the run did its work; the next one resumes.
        return Outcome.SUCCESS
    if exit_code == ExitCode.LOCKED:
        return Outcome.SKIP  # another run holds the ledger: that one is doing this work
    return Outcome.FAIL


# Failures a later try may get past: the API back, a stopped run resumed. 2 (settings, manifest, ledger, output
# folder) and 70 (a bug) need a person first.
RETRIED = frozenset({ExitCode.SYSTEMIC, ExitCode.SIGINT, ExitCode.SIGTERM})


class BackfillConfig(dg.Config):
    manifest: str  # a path, or an s3://, gs://, az:// or https:// URL
    settings: dict[str, Any]  # the config file's keys: env, rate, ledger, out, ...


@dg.op(out={"run_dir": dg.Out(str, is_required=False)})
def backfill_users(context: dg.OpExecutionContext, config: BackfillConfig) -> Iterator[dg.Output[str]]:
    """One `backfill run`. No output when skipped, so the steps after it are skipped too."""
    result: backfill.RunResult | None = None
    try:
        result = backfill.run(config.manifest, **config.settings)
        code, said = result.exit_code, result.stop_reason
    except backfill.SystemicStop as stop:
        result, code, said = stop.result, stop.exit_code, str(stop)  # its outputs are written
    except backfill.BackfillError as error:
        code, said = error.exit_code, str(error)
    metadata: dict[str, Any] = {"exit_code": int(code)}  # a plain number: Dagster stores metadata as JSON
    if result is not None:
        metadata |= {"run_dir": str(result.run_dir), "ledger": result.ledger, **result.counts}
    decided = outcome(code)
    if decided is Outcome.FAIL:
        raise dg.Failure(f"backfill exit {code}: {said}", metadata=metadata, allow_retries=code in RETRIED)
    if decided is Outcome.SKIP:
        context.log.info(f"skipped (exit {code}): {said}")
        return
    assert result is not None
    if code == ExitCode.ROWS_LEFT:
        context.log.warning(f"rows rejected or left: {result.counts}; see {result.run_dir}")
    yield dg.Output(str(result.run_dir), "run_dir", metadata=metadata)


@dg.op
def report(context: dg.OpExecutionContext, run_dir: str) -> dict[str, int]:
    """What comes after a run that did its work: here, the counts from its summary.json (a notification, an
    export of results.csv, ... in a real pipeline)."""
    with open(f"{run_dir}/summary.json", encoding="utf-8") as handle:
        counts: dict[str, int] = json.load(handle)["counts"]
    context.log.info(f"backfilled: {counts}")
    return counts


@dg.graph
def nightly() -> None:
    report(backfill_users())


# Exit 4, 130 or 143 is tried again 5 and 10 minutes later; the other failures at once need a person.
nightly_backfill = nightly.to_job(
    name="nightly_backfill",
    op_retry_policy=dg.RetryPolicy(max_retries=2, delay=300, backoff=dg.Backoff.EXPONENTIAL),
)
defs = dg.Definitions(
    jobs=[nightly_backfill],
    schedules=[
        dg.ScheduleDefinition(
            job=nightly_backfill,
            cron_schedule="15 2 * * *",
            execution_timezone="Etc/UTC",
            run_config=dg.RunConfig(
                ops={
                    "backfill_users": BackfillConfig(
                        manifest="/data/users.csv", settings={"env": "production", "rate": 20}
                    )
                }
            ),
        )
    ],
)
