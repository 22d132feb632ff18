"""The engine: resume decision, rate-limited signed sends with retries, and the settling of every answer."""
