"""`backfill sandbox`: serve the local emulator of the API, with faults to rehearse against."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
@click.option("--reset-before-rate", default=0.0, show_default=True, type=float,
              help="Fraction of connections reset before the request is processed.")  # fmt: skip
@click.option("--reset-after-rate", default=0.0, show_default=True, type=float,
              help="Fraction of enrollments committed, then the connection reset (the answer is lost).")  # fmt: skip
@click.option("--slow-rate", default=0.0, show_default=True, type=float,
              help="Fraction of enrollments committed, then answered after --slow-ms.")  # fmt: skip
@click.option("--slow-ms", default=30_000.0, show_default=True, type=float)
@click.option("--systemic-code", help='Answer every request with this code, e.g. "2205".')
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for generated IDs and faults.")
@click.option("--state-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Keep enrollments here, so 2209 stays true across restarts.")  # fmt: skip
@click.option("--request-log", type=click.Path(path_type=Path, dir_okay=False),
              help="Append one JSON line per request: user_id and the answer.")  # fmt: skip
@guard
def sandbox(
    host: str, port: int, seed: int, state_file: Path | None, request_log: Path | None, **faults: Any
) -> None:
    """Serve a local emulator of the backfill_users API, with faults to rehearse against."""
    from ..sandbox import Faults, serve

    partner_id = os.environ.get("SMILE_PARTNER_ID", LOCAL_PARTNER_ID)
    api_key = os.environ.get("SMILE_API_KEY", LOCAL_API_KEY)
    faults["retry_after_s"] = faults.pop("retry_after")
    chosen = Faults(**faults)

    def ready(base_url: str) -> None:
        click.echo(f"sandbox on {base_url} for partner {partner_id} (Ctrl-C to stop)", err=True)

    serve(partner_id, api_key, host=host, port=port, faults=chosen, seed=seed, state_file=state_file,
          request_log=request_log, ready=ready)  # fmt: skip
