"""Speed and memory: the sweep of every mechanism across lengths (``speed``), alternating A/B timing
of two mechanisms (``compare``) and the harness's own overhead (``overhead``). Builds on
``harness.train`` (the model of the train-step mode) and ``harness.core``."""

from harness.bench.compare import run_compare
from harness.bench.overhead import run_overhead
from harness.bench.speed import run_sweep

__all__ = ["run_compare", "run_overhead", "run_sweep"]
