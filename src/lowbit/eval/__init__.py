"""Evaluation: the project's ruler.

* :mod:`lowbit.eval.quality`: perplexity under a fixed protocol, KL divergence (both directions)
  and top-1 agreement against a baseline (all models in lockstep).
* :mod:`lowbit.eval.reference`: the baseline's side computed once and cached on disk (exact
  hidden states, or compact top-k), variants scored against it one at a time.
* :mod:`lowbit.eval.streaming`: the forward pass over all windows one decoder block at a time,
  for models that do not fit in memory.
* :mod:`lowbit.eval.latency`: prefill / decode speed with the model's KV cache.
* :mod:`lowbit.eval.size`: bytes on disk.
* :mod:`lowbit.eval.report`: text/Markdown tables and the perplexity-vs-bits plot
  (matplotlib is imported only when plotting).
"""

from lowbit.eval.latency import LatencyResult, measure_latency  # noqa: F401
from lowbit.eval.quality import PplProtocol, QualityResult, evaluate_quality, perplexity  # noqa: F401
from lowbit.eval.report import format_table, plot_ppl_vs_bits  # noqa: F401
from lowbit.eval.size import dir_size_bytes, human_bytes  # noqa: F401

__all__ = [
    "PplProtocol",
    "QualityResult",
    "evaluate_quality",
    "perplexity",
    "LatencyResult",
    "measure_latency",
    "dir_size_bytes",
    "human_bytes",
    "format_table",
    "plot_ppl_vs_bits",
]
