"""Benchmarks, run as commands; results go to docs/."""
