"""Benchmarks: `python -m benchmarks` runs the suite and writes RESULTS.md."""
