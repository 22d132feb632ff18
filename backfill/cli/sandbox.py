"""`backfill sandbox`: serve the local emulator of the API, with faults to rehearse against."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ._common import LOCAL_API_KEY, LOCAL_PARTNER_ID, guard


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option("--latency-ms", default=0.0, show_default=True, type=float, help="Delay added to every answer.")
@click.option("--jitter-ms", default=0.0, show_default=True, type=float, help="Latency varies by up to this.")
@click.option(
    "--error-rate", default=0.0, show_default=True, type=float, help="Fraction answered 500/502/503."
)
@click.option("--rate-limit", type=float, help="Answer 429 with Retry-After above this many requests/s.")
@click.option(
    "--retry-after", default=1.0, show_default=True, type=float, help="Retry-After on error answers."
)
@click.option(
    "--reset-before-rate",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of connections reset before the request is processed.",
)
@click.option(
    "--reset-after-rate",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of enrollments committed, then the connection reset (the answer is lost).",
)
@click.option(
    "--slow-rate",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of enrollments committed, then answered after --slow-ms.",
)
@click.option("--slow-ms", default=30_000.0, show_default=True, type=float)
@click.option("--systemic-code", help='Answer every request with this code, e.g. "2205".')
@click.option(
    "--foreign-ids",
    type=click.Path(path_type=Path, dir_okay=False),
    help="File of user_ids (one a line) already enrolled by another partner user: "
    "each answers 2209 from its first request and is never enrolled.",
)
@click.option(
    "--foreign-rate",
    default=0.0,
    show_default=True,
    type=float,
    help="Fraction of all user_ids that are foreign like --foreign-ids, picked from --seed and "
    "the user_id, so a restart with the same seed picks the same IDs.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed for generated IDs, faults and which IDs --foreign-rate picks.",
)
@click.option(
    "--state-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Keep enrollments here, so 2209 stays true across restarts.",
)
@click.option(
    "--request-log",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Append one JSON line per request and per answer: user_id, the answer, and "
    '"foreign": true for a foreign ID.',
)
@guard
def sandbox(
    host: str,
    port: int,
    latency_ms: float,
    jitter_ms: float,
    error_rate: float,
    rate_limit: float | None,
    retry_after: float,
    reset_before_rate: float,
    reset_after_rate: float,
    slow_rate: float,
    slow_ms: float,
    systemic_code: str | None,
    foreign_ids: Path | None,
    foreign_rate: float,
    seed: int,
    state_file: Path | None,
    request_log: Path | None,
) -> None:
    """Serve a local emulator of the backfill_users API, with faults to rehearse against."""
    from ..sandbox import Faults, SandboxOptions, read_foreign_ids, serve

    faults = Faults(
        latency_ms=latency_ms,
        jitter_ms=jitter_ms,
        error_rate=error_rate,
        rate_limit=rate_limit,
        retry_after_s=retry_after,
        reset_before_rate=reset_before_rate,
        reset_after_rate=reset_after_rate,
        slow_rate=slow_rate,
        slow_ms=slow_ms,
        systemic_code=systemic_code,
        foreign_ids=read_foreign_ids(foreign_ids) if foreign_ids is not None else frozenset(),
        foreign_rate=foreign_rate,
    )
    options = SandboxOptions(
        partner_id=os.environ.get("SMILE_PARTNER_ID", LOCAL_PARTNER_ID),
        api_key=os.environ.get("SMILE_API_KEY", LOCAL_API_KEY),
        faults=faults,
        seed=seed,
        state_file=state_file,
        request_log=request_log,
    )

    def ready(base_url: str) -> None:
        click.echo(f"sandbox on {base_url} for partner {options.partner_id} (Ctrl-C to stop)", err=True)

    serve(options=options, host=host, port=port, ready=ready)
