"""Benchmarks: `make bench` runs them all via bench/run.py."""
