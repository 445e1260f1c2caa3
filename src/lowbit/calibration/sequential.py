"""The sequential (block-by-block) calibration runner.

The only place that knows about decoder blocks, hooks and devices:

1. capture the keyword arguments every block receives (attention mask, rotary embeddings, ...)
   from one forward pass of the float model on one calibration sample — they depend only on the
   sequence length, and some families (Gemma 3) give different blocks different masks;
2. capture the hidden states entering block 0 for all calibration samples (the forward pass is
   stopped right there);
3. for each block in order: move it to the device; if the method needs data, run the block with
   forward hooks on its linear layers so the method can observe their inputs; ask the method for
   each layer's replacement; run the now-quantized block to produce the inputs of the next block
   (errors of earlier blocks are thus visible to later ones); move the block back.

Only one block and the activations live on the device at a time. Peak memory is measured while
the runner works (process RSS sampled in a thread; CUDA's allocator peak on GPUs).

Scale-out: when ``torch.distributed`` is initialized with several processes, each process passes
its own share of the calibration samples; after a block's observation pass the method's
`statistics()` (sums over samples) are all-reduced, so every process solves the same problem and
ends with the same quantized block.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.base import Method
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks, linear_layers, block_prefix


class _StopForward(Exception):
    pass


@dataclass
class RunnerStats:
    n_samples: int
    seq_len: int
    seconds: float
    peak_rss_bytes: int          # process peak while the runner worked
    rss_at_start_bytes: int      # process RSS when it started (model already loaded)
    activation_bytes: int        # one full set of block inputs (the outputs take as much again)
    largest_block_bytes: int
    cuda_peak_bytes: int | None  # torch.cuda.max_memory_allocated during the run (GPU only)
    device: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the process RSS every few milliseconds in a background thread."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def _to(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, sample: Tensor) -> list[dict]:
    """Keyword arguments each block is called with, for a [1, L] sample (float model, its device)."""
    blocks = find_blocks(model)
    captured: list[dict | None] = [None] * len(blocks)
    handles = []
    for i, blk in enumerate(blocks):
        def pre_hook(mod, args, kwargs, i=i):
            kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
            kw["use_cache"] = False
            kw["cache"] = None
            if "past_key_values" in kw:
                kw["past_key_values"] = None
            captured[i] = kw
        handles.append(blk.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        model(input_ids=sample, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise LowbitError("could not capture the inputs of every decoder block (unexpected model structure)")
    return captured  # type: ignore[return-value]


@torch.no_grad()
def capture_block0_inputs(model: nn.Module, samples: Tensor, batch_size: int, device) -> list[Tensor]:
    """Hidden states entering block 0, in batches, stored on ``device``."""
    block0 = find_blocks(model)[0]
    inputs: list[Tensor] = []

    def pre_hook(mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        inputs.append(hs.detach().to(device))
        raise _StopForward

    h = block0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, samples.shape[0], batch_size):
            try:
                model(input_ids=samples[i:i + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    return inputs


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def run_sequential(model: nn.Module, method: Method, samples: Tensor, device: str | torch.device = "cpu",
                   batch_size: int = 8, progress: bool = True) -> RunnerStats:
    """Quantize every linear layer of every decoder block of ``model`` in place with ``method``.

    ``samples`` is a LongTensor [n, L] of calibration token ids. The model's embedding and
    everything before block 0 run on the model's current device (normally the CPU).
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise LowbitError(f"calibration samples must be a non-empty [n, seq_len] tensor, got {tuple(samples.shape)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    blocks = find_blocks(model)
    home = next(model.parameters()).device
    t0 = time.perf_counter()
    with _PeakRSS() as mem:
        block_kwargs = [_to(kw, device) for kw in capture_block_kwargs(model, samples[:1].to(home))]
        X = capture_block0_inputs(model, samples.to(home), batch_size, device)
        act_bytes = sum(x.numel() * x.element_size() for x in X)
        largest = 0
        bar = tqdm(blocks, desc=f"{method.name} blocks", unit="block", disable=not progress, leave=False)
        for i, blk in enumerate(bar):
            blk.to(device)
            largest = max(largest, _module_bytes(blk))
            kw = block_kwargs[i]
            prefix = block_prefix(model, i)
            layers = linear_layers(blk)
            if method.needs_calibration:
                handles = []
                for name, lin in layers.items():
                    def hook(mod, args, out, full=f"{prefix}.{name}"):
                        method.observe(full, mod, args[0])
                    handles.append(lin.register_forward_hook(hook))
                try:
                    for x in X:
                        blk(x, **kw)
                finally:
                    for h in handles:
                        h.remove()
                _all_reduce_statistics(method)
                method.transform_block(blk, prefix, X, kw)
                layers = linear_layers(blk)
            for name, lin in layers.items():
                _set_submodule(blk, name, method.apply(f"{prefix}.{name}", lin))
            X = [_block_output(blk(x, **kw)) for x in X]
            blk.to(home)
        bar.close()
    stats = RunnerStats(
        n_samples=int(samples.shape[0]), seq_len=int(samples.shape[1]), seconds=time.perf_counter() - t0,
        peak_rss_bytes=mem.peak, rss_at_start_bytes=mem.start, activation_bytes=act_bytes,
        largest_block_bytes=largest,
        cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None, device=str(device))
    return stats


def _all_reduce_statistics(method: Method) -> None:
    """Sum the method's per-sample statistics over all processes (no-op in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, t in sorted(method.statistics().items()):
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


@torch.no_grad()
def apply_data_free(model: nn.Module, method: Method, progress: bool = True) -> None:
    """Apply a method that needs no data to every linear layer of every block, in place.

    A model outside the decoder families (an encoder such as BERT, a plain classifier) has no
    block table: there every ``nn.Linear`` of the whole model is replaced, in module order."""
    from lowbit.models.families import FAMILIES

    prepare = getattr(method, "prepare_model", None)  # optional: see the whole model first (global pruning)
    if prepare is not None:
        prepare(model)
    if getattr(getattr(model, "config", None), "model_type", None) not in FAMILIES:
        layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        for name, lin in tqdm(layers, desc=f"{method.name} layers", unit="layer", disable=not progress, leave=False):
            _set_submodule(model, name, method.apply(name, lin))
        return
    blocks = find_blocks(model)
    for i, blk in enumerate(tqdm(blocks, desc=f"{method.name} blocks", unit="block", disable=not progress, leave=False)):
        prefix = block_prefix(model, i)
        for name, lin in linear_layers(blk).items():
            _set_submodule(blk, name, method.apply(f"{prefix}.{name}", lin))
