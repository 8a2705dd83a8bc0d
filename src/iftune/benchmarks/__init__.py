"""`iftune bench` (the cost of a training step by method) and micro-benchmarks.

setup: sizes, presets, model, data and each method's trainer; baselines: the same-path SFT and
the full-logits IFT trainers; measure: interleaved timing and per-process peak memory; run: the
whole benchmark and its ratios; profile: the phases of an IFT step; command: the `iftune bench`
command line; ops: `python -m iftune.benchmarks.ops`, the objective's own arithmetic.
"""
