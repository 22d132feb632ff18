"""report.html's markup from a Page: jinja2 templates shipped in this package, autoescaped, strict."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from ...version import __version__
from .migration import MigrationPage
from .page import Page

if TYPE_CHECKING:
    import jinja2

__all__ = [
    "MIGRATION_KIND",
    "MIGRATION_TEMPLATE",
    "RUN_KIND",
    "TEMPLATE",
    "generator",
    "render_migration",
    "render_page",
]

TEMPLATE = "report.html.j2"
MIGRATION_TEMPLATE = "migration.html.j2"
# Each kind is named in the page's generator meta, so a run's report and a ledger's never replace each other.
RUN_KIND, MIGRATION_KIND = "run report", "migration report"


def _coord(value: float) -> str:
    return f"{value:.1f}"


@cache
def _environment() -> jinja2.Environment:
    import jinja2  # here: every run tallies its report, but jinja2 loads only when one is written

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("backfill.outputs.report", "templates"),
        # Every value on the page comes from files a partner or an API answer filled in: all of it is text.
        autoescape=True,
        # A misspelt field must fail the render, not print as nothing on a page someone signs.
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["coord"] = _coord
    return env


def generator(kind: str) -> str:
    """The content of a report's generator meta: what `write_report` recognises as a page of its own."""
    return f"backfill {__version__}; {kind}"


def render_page(page: Page) -> str:
    return _environment().get_template(TEMPLATE).render(page=page, generator=generator(RUN_KIND))


def render_migration(page: MigrationPage) -> str:
    return (
        _environment().get_template(MIGRATION_TEMPLATE).render(page=page, generator=generator(MIGRATION_KIND))
    )
