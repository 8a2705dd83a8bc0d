"""`iftune eval` (lm-evaluation-harness benchmarks, the paper's Table 3) and `iftune generate`
(AlpacaEval-ready generations)."""

from iftune.evaluation.generate import generate_main
from iftune.evaluation.run import main

__all__ = ["generate_main", "main"]
