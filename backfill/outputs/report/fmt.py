"""The text forms the report shows numbers in: counts, shares, durations, latencies and time offsets."""

from __future__ import annotations

MAX_SHOWN_CHARS = 300  # a multi-kilobyte error text would push the tables off the page


def clip(text: str) -> str:
    """Free text from the CSVs cut short: it can be kilobytes long."""
    return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "…"


def count(value: int) -> str:
    return f"{value:,}"


def share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:02d} s"
    return f"{minutes} min {secs:02d} s"


def bucket(seconds: float) -> tuple[str, str]:
    """A bucket's size as (number, unit), which the page joins with a no-break space."""
    for unit, name in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= unit:
            amount = seconds / unit
            plural = "s" if name == "day" and amount != 1 else ""
            return f"{amount:g}", name + plural
    return f"{seconds:g}", "s"


def offset(seconds: float) -> str:
    """An axis label: the shortest exact form of an offset from the run's start."""
    if seconds == 0:
        return "0"
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m" + (f"{secs:02d}s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h" + (f"{minutes:02d}m" if minutes else "")


def ms(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:,.3g} s" if value < 100_000 else f"{value / 1000:,.0f} s"
    return f"{value:,.0f} ms"
