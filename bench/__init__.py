"""Benchmarks: bench/run.py (relay vs Postfix); see docs/benchmark.md."""
