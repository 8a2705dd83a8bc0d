"""Micro-benchmarks: `python -m iftune.benchmarks.<name>`."""
