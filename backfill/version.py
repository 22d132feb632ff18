"""The tool's version, in its one home below everything that says it (--version, the report, the metrics)."""

__version__ = "0.1.0"
