"""The run's log: stable event names, one run_id on every record, never a secret or photo bytes."""

from __future__ import annotations

import logging
from collections.abc import Callable

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


class UserIdsNamed(logging.Filter):
    """Names the user of each record of the `backfill` logger as `shown(user_id)` says (log_user_ids).

    Every record about one user carries it in its fields (`user_id`), as Events and the ledger's own lines do;
    its message and every text field then say `shown(user_id)` wherever they said the ID. The handlers (the
    terminal, --log-file, a log shipper) only ever see the record so rewritten.
    """

    def __init__(self, shown: Callable[[str], str]) -> None:
        super().__init__()
        self._shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        user_id = fields.get("user_id") if isinstance(fields, dict) else None
        if isinstance(fields, dict) and isinstance(user_id, str) and user_id:
            shown = self._shown(user_id)
            record.msg, record.args = record.getMessage().replace(user_id, shown), None
            record.fields = {
                k: v.replace(user_id, shown) if isinstance(v, str) else v for k, v in fields.items()
            }
        return True


def name_users(shown: Callable[[str], str] | None) -> Callable[[], None]:
    """From now on, every user_id the run logs is said as `shown` says (None: as it is); call what it returns
    to stop."""
    if shown is None:
        return lambda: None
    naming = UserIdsNamed(shown)
    log.addFilter(naming)
    return lambda: log.removeFilter(naming)
