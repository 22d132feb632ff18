"""backfill: enroll a partner's existing users into Smile ID, resumably and exactly once per user_id."""

from .version import __version__

__all__ = ["__version__"]
