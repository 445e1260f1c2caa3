"""Lean batch-1 inference: a decoder over the model's own modules with a preallocated KV cache,
sampling, streaming generation and speed measurement.

    from lowbit.runtime import LeanDecoder, SamplingParams, generate
    dec = LeanDecoder(model, max_len=512)
    for tok in generate(dec, prompt_ids, max_new_tokens=32, sampling=SamplingParams(temperature=0)):
        ...
"""

from lowbit.runtime.decoder import LeanDecoder, linear_fn
from lowbit.runtime.generate import GenerationStats, TextStream, generate, run_generation
from lowbit.runtime.sampling import SamplingParams, sample_next
from lowbit.runtime.timing import bench_prompt, measure_lean

__all__ = ["GenerationStats", "LeanDecoder", "SamplingParams", "TextStream", "bench_prompt", "generate", "linear_fn",
           "measure_lean", "run_generation", "sample_next"]
