"""backfill: enroll a partner's existing users into Smile ID, resumably and exactly once per user_id."""

__version__ = "0.1.0"
