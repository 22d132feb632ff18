"""The run's log: stable event names, one run_id on every record, never a secret or photo bytes."""

from __future__ import annotations

import logging

log = logging.getLogger("backfill")


class Events:
    """`events(level, "row_finished", message, **fields)` logs one event of this run, if anyone listens.

    Handlers (cli/logs.py) read `event`, `run_id` and `fields` from the record to write JSON lines or text.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __call__(self, level: int, event: str, message: str, **fields: object) -> None:
        if log.isEnabledFor(level):
            log.log(level, message, extra={"event": event, "run_id": self.run_id, "fields": fields})

    @staticmethod
    def enabled(level: int) -> bool:
        return log.isEnabledFor(level)
