"""The sample data `backfill demo` runs, shipped in the package; sample_data/make_sample_data.py writes it."""
