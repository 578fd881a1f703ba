"""Benchmarks, one per file: `python -m experiments.bench.NAME` prints one JSON line per result
with at least the keys bench, case, metric, value and goal (DESIGN.md "Habits")."""
