"""The sequential (block-by-block) calibration runner.

The only place that knows about decoder blocks, hooks and devices:

1. capture the keyword arguments every block receives (attention mask, rotary embeddings, ...)
   from one forward pass of the float model on one calibration sample — they depend only on the
   sequence length, and some families (Gemma 3) give different blocks different masks;
2. capture the hidden states entering block 0 for all calibration samples (the forward pass is
   stopped right there);
3. for each block in order: move it to the device; if the method needs data, run the block with
   forward hooks on its linear layers so the method can observe their inputs; ask the method for
   each layer's replacement; for a method that fine-tunes blocks (``tunes_blocks``), let it tune
   the quantized block towards the float block's outputs on the same inputs (kept from the
   observation pass); run the now-quantized block to produce the inputs of the next block
   (errors of earlier blocks are thus visible to later ones); move the block back.

Only one block and the activations live on the device at a time. Peak memory is measured while
the runner works (process RSS sampled in a thread; CUDA's allocator peak on GPUs).

Streaming (``stream=Streaming(lazy, writer, dtype)``): the model is a skeleton whose parameters
are on the meta device (``lowbit.models.lazy``). The embedding is materialized for step 2 only;
the block kwargs of step 1 are captured with the blocks left on meta (the forward pass runs on
meta tensors from block 0 on, costing nothing). In step 3 each block is materialized from the
files in the compute dtype on the device, quantized, its final tensors handed to the shard
writer, and released, so the model never exists in memory as a whole. Data-free methods take
the same per-block path (``apply_data_free(..., stream=...)``).

Activations: the hidden states between two blocks are held in an ``Activations`` store; past a
byte budget (counting inputs and outputs together) further batches go to files in an offload
folder and are read back one batch at a time. Files hold the exact tensors, so spilling never
changes a result.

Scale-out: when ``torch.distributed`` is initialized with several processes (torchrun), the
batches, the observation and the layer solves are divided among them by
`lowbit.calibration.distributed` (the lines marked "scale-out" below), with a result
bit-identical to one process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit.algorithms.base import Method
from lowbit.calibration import distributed
from lowbit.core.memory import fixed_mmap_threshold, release_free_memory
from lowbit.errors import LowbitError
from lowbit.models.families import block_prefix, family_of, find_blocks, linear_layers
from lowbit.core.grid import all_finite


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
    streaming: bool = False      # blocks read from the files one at a time (lowbit.models.lazy)
    dtype: str | None = None     # compute dtype of the blocks
    spilled_bytes: int = 0       # activation bytes that went to the offload folder
    batch_size: int = 0          # samples per forward (`runner_batch` unless given)
    resumed_blocks: int = 0      # finished blocks taken from an interrupted run (lowbit.calibration.resume)

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


class SpillPool:
    """The byte budget shared by all activation stores of a run, and the folder they spill to.

    ``budget=None``: no limit (nothing is ever written). The folder is created on the first
    spill, inside ``offload_dir`` (default: the system's temporary folder), and removed by
    ``close``."""

    def __init__(self, budget: int | None = None, offload_dir: str | os.PathLike | None = None, device="cpu"):
        if budget is not None and budget < 0:
            raise LowbitError(f"the activation budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.offload_dir = offload_dir
        self.device = torch.device(device)
        self.used = 0
        self.spilled = 0
        self.folder: Path | None = None
        self._n = 0

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` in memory if the budget allows."""
        if self.budget is not None and self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def new_file(self) -> Path:
        if self.folder is None:
            if self.offload_dir is not None:
                Path(self.offload_dir).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix=".lowbit-activations-", dir=self.offload_dir))
        self._n += 1
        return self.folder / f"batch-{self._n:06d}.pt"

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class Activations:
    """The hidden states of every calibration batch at one point of the model, in order.

    Iterating yields each batch on the pool's device; batches past the pool's budget live in
    files (exact copies) and are read back one at a time."""

    def __init__(self, pool: SpillPool):
        self.pool = pool
        self.items: list[Tensor | Path] = []
        self.nbytes = 0

    def append(self, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        self.nbytes += n
        if self.pool.take(n):
            self.items.append(t)
            return
        path = self.pool.new_file()
        try:
            torch.save(t.detach().to("cpu"), path)
        except OSError as e:
            raise LowbitError(f"cannot write activations to {path.parent}: {e.strerror or e}") from None
        self.pool.spilled += n
        self.items.append(path)

    def _get(self, item) -> Tensor:
        if isinstance(item, Tensor):
            return item
        return torch.load(item, weights_only=True).to(self.pool.device)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tensor:
        return self._get(self.items[i])

    def __iter__(self):
        for item in self.items:
            yield self._get(item)

    def release(self) -> None:
        """Give the in-memory bytes back to the pool and delete the files."""
        for item in self.items:
            if isinstance(item, Tensor):
                self.pool.used -= item.numel() * item.element_size()
            else:
                item.unlink(missing_ok=True)
        self.items = []


@dataclass
class Streaming:
    """Where the blocks come from and go to in the streaming mode: materialized from ``lazy``
    (a ``lowbit.models.lazy.LazyModel``) in ``dtype`` (None: the files' dtype), handed to
    ``writer`` (a ``checkpoint.ShardWriter``) once final, then released."""

    lazy: object
    writer: object
    dtype: torch.dtype | None = None

    def load(self, prefix: str, device) -> nn.Module:
        return self.lazy.materialize(prefix, self.dtype, device)

    def load_for_layers(self, prefix: str, device) -> nn.Module:
        """The block for a data-free method: its linear layers stay in the files' dtype until
        `layer` converts each just before it is solved (a bf16 block takes half the memory of
        its float32 copy, and only one layer is ever held in both); everything else is in
        ``dtype`` at once. The conversion is the one `load` makes, so results are the same."""
        blk = self.lazy.materialize(prefix, None, device)
        if self.dtype is not None:
            lin = {id(p) for m in linear_layers(blk).values() for p in m.parameters()}
            for mod in blk.modules():
                for k, p in list(mod._parameters.items()):
                    if p is not None and id(p) not in lin and p.is_floating_point() and p.dtype != self.dtype:
                        mod._parameters[k] = nn.Parameter(p.detach().to(self.dtype), requires_grad=False)
        return blk

    def layer(self, lin: nn.Module) -> nn.Module:
        """A linear layer of a `load_for_layers` block in ``dtype`` (in place)."""
        return lin if self.dtype is None else lin.to(self.dtype)

    def store(self, prefix: str, module: nn.Module) -> None:
        from lowbit.checkpoint import _unique_state_dict

        self.writer.add({f"{prefix}.{k}": t for k, t in _unique_state_dict(module).items()})
        self.lazy.release(prefix)
        release_free_memory()


@torch.no_grad()
def capture_block_kwargs(model: nn.Module, sample: Tensor) -> list[dict]:
    """Keyword arguments each block is called with, for a [1, L] sample (float model, its device).

    The forward pass stops once the last block's arguments are known. Blocks whose parameters are
    on the meta device (streaming) run on meta copies of their inputs: shapes only, no memory."""
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
            if i == len(blocks) - 1:
                raise _StopForward
            if any(p.is_meta for p in mod.parameters()):
                return _to(args, "meta"), _to(kwargs, "meta")
            return None
        handles.append(blk.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        model(input_ids=sample, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise LowbitError("could not capture the inputs of every decoder block (unexpected model structure)")
    return captured  # type: ignore[return-value]


@torch.no_grad()
def embedding_rows(lazy, embed: str, tokens: Tensor, dtype, device) -> Tensor:
    """Materialize the embedding ``embed`` of a streamed model for ``tokens`` only: with a lazy
    model that can (`lowbit.models.lazy.LazyModel.materialize_rows`), a compact table of the
    distinct tokens, and ``tokens`` renumbered into it (the model sees the same vectors; the
    forward pass uses the ids for nothing else); otherwise the whole table and ``tokens`` as
    they are. `release(embed)` undoes either."""
    rows = getattr(lazy, "materialize_rows", None)
    if rows is None:
        lazy.materialize(embed, dtype, device)
        return tokens
    ids = torch.unique(tokens)
    rows(embed, ids, dtype, device)
    return torch.searchsorted(ids, tokens)


def capture_block0_inputs(model: nn.Module, samples: Tensor, batch_size: int, device,
                          pool: SpillPool | None = None) -> Activations:
    """Hidden states entering block 0, in batches, stored on ``device`` (within ``pool``'s budget)."""
    block0 = find_blocks(model)[0]
    inputs = Activations(pool or SpillPool(device=device))

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


def _replacement(lin: nn.Module, result) -> nn.Module:
    from lowbit.nn.replace import replacement

    return replacement(lin, result)


def solve_layer(method: Method, name: str, lin: nn.Linear) -> nn.Module:
    """The module that replaces linear ``lin``: the method's result (a weight format, or a dense
    weight) in its module (`lowbit.nn.replace.replacement`)."""
    return _replacement(lin, method.apply(name, lin))


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


RUNNER_BATCH = 8                 # calibration samples per forward, at most
BATCH_ACTIVATION_BYTES = 64 << 20  # ... and at most this many bytes in one float32 linear output


def runner_batch(block: nn.Module, seq_len: int, largest: int = RUNNER_BATCH) -> int:
    """Samples per forward: ``largest``, fewer when one [batch, seq_len, width] float32 tensor of
    the block's widest linear layer would exceed BATCH_ACTIVATION_BYTES. A forward holds a few
    such tensors (an MLP's gate, up and their product) and a layer's input is what a method
    observes, so this bounds what a wide model adds on top of its statistics: 8 samples of 512
    tokens through Llama-3.2-1B's 8192-wide MLP are 128 MB per tensor; SmolLM2 and Gemma-3-270M
    keep all 8."""
    widths = [max(lin.in_features, lin.out_features) for lin in linear_layers(block).values()]
    per_sample = seq_len * max(widths, default=1) * 4
    return max(1, min(largest, BATCH_ACTIVATION_BYTES // per_sample))


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def run_sequential(model: nn.Module, method: Method, samples: Tensor, device: str | torch.device = "cpu",
                   batch_size: int | None = None, progress: bool = True, *, stream: Streaming | None = None,
                   activation_budget: int | None = None, offload_dir: str | os.PathLike | None = None,
                   state=None) -> RunnerStats:
    """Quantize every linear layer of every decoder block of ``model`` in place with ``method``.

    ``samples`` is a LongTensor [n, L] of calibration token ids, run ``batch_size`` at a time
    (None: `runner_batch`, which depends only on the model's shape and L, so that one process,
    torchrun and a streamed run cut the same batches). The model's embedding and
    everything before block 0 run on the model's current device (normally the CPU); with
    ``stream`` on the CPU, with the embedding materialized in the compute dtype meanwhile.
    Activations beyond ``activation_budget`` bytes (None: no limit) spill to ``offload_dir``.
    ``state`` (a prepared `lowbit.calibration.resume.RunState`) keeps each finished block and,
    from time to time, the hidden states after it on disk, and starts after the blocks an
    interrupted run finished.
    """
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise LowbitError(f"calibration samples must be a non-empty [n, seq_len] tensor, got {tuple(samples.shape)}")
    device = torch.device(device)
    fixed_mmap_threshold()  # large frees go back to the system (lowbit.core.memory)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    split = distributed.Split.current()  # scale-out: None in one process
    tunes = method.needs_calibration and method.tunes_blocks
    if split is not None:
        split.check(method)
        if tunes:
            raise LowbitError(f"{method.name}'s block fine-tuning runs in one process; run it without torchrun "
                              "or without fine-tuning (finetune_steps=0)")
        progress = progress and split.rank == 0
    blocks = find_blocks(model)
    if batch_size is None:
        batch_size = runner_batch(blocks[0], samples.shape[1])
    home = torch.device("cpu") if stream is not None else next(model.parameters()).device
    pool = SpillPool(activation_budget, offload_dir, device)
    t0 = time.perf_counter()
    try:
        with _PeakRSS() as mem:
            tokens = samples
            if stream is not None:
                embed = family_of(model).embed
                tokens = embedding_rows(stream.lazy, embed, samples, stream.dtype, home)
            block_kwargs = [_to(kw, device) for kw in capture_block_kwargs(model, tokens[:1].to(home))]
            own = tokens if split is None else split.own_samples(tokens, batch_size)  # scale-out: own batches
            start = state.done if state is not None else 0
            if start:  # resumed: the hidden states after the last finished block, as they were
                X = Activations(pool)
                state.load_activations(X)
                state.restore_records(method)
            else:
                X = capture_block0_inputs(model, own.to(home), batch_size, device, pool)
            if stream is not None:
                stream.lazy.release(embed)
            act_bytes = X.nbytes
            largest = 0
            dtype = None
            bar = tqdm(blocks, desc=f"{method.name} blocks", unit="block", disable=not progress, leave=False)
            for i, blk in enumerate(bar):
                prefix = block_prefix(model, i)
                if i < start:  # finished by the interrupted run: installed (or written) as it was
                    state.restore_block(i, blk, f"resumed block {i}")
                    if stream is not None:
                        stream.store(prefix, blk)
                    else:
                        blk.to(home)
                    continue
                if stream is not None:
                    blk = stream.load(prefix, device)
                else:
                    blk.to(device)
                largest = max(largest, _module_bytes(blk))
                dtype = dtype or next((p.dtype for p in blk.parameters() if p.is_floating_point()), None)
                kw = block_kwargs[i]
                layers = linear_layers(blk)
                T = Activations(pool) if tunes else None
                if method.needs_calibration and split is not None:  # scale-out: layers observed by their owners
                    split.observe(method, {f"{prefix}.{n}": lin for n, lin in layers.items()}, X,
                                  lambda x: blk(x, **kw))
                elif method.needs_calibration:
                    observe_block(method, blk, prefix, layers, X, kw, T)
                if method.needs_calibration:
                    method.transform_block(blk, prefix, X, kw)
                    layers = linear_layers(blk)
                if split is not None:  # scale-out: each layer solved by its owner, installed everywhere
                    split.apply(method, {f"{prefix}.{n}": lin for n, lin in layers.items()},
                                install=lambda full, new: _set_submodule(blk, full[len(prefix) + 1:], new))
                else:
                    for name, lin in layers.items():
                        _set_submodule(blk, name, solve_layer(method, f"{prefix}.{name}", lin))
                if T is not None:  # the quantized block tuned towards the float block's outputs
                    for name, fmt in (method.tune_block(blk, prefix, X, T, kw) or {}).items():
                        _set_submodule(blk, name, _replacement(blk.get_submodule(name), fmt))
                    T.release()
                if state is not None:
                    state.save_block(i, blk)
                if i + 1 < len(blocks):  # the last block's outputs feed nothing
                    Y = Activations(pool)
                    for j, x in enumerate(X):
                        y = _block_output(blk(x, **kw))
                        if not all_finite(y):
                            _nonfinite(blk, x, kw, prefix, i, j, dtype)
                        Y.append(y)
                    X.release()
                    X = Y
                if state is not None and (i + 1 == len(blocks) or _agreed(state.due(), split)):
                    state.save_progress(i + 1, X if i + 1 < len(blocks) else [], method)
                if stream is not None:
                    stream.store(prefix, blk)
                else:
                    blk.to(home)
            X.release()
            bar.close()
    finally:
        pool.close()
    stats = RunnerStats(
        n_samples=int(samples.shape[0]), seq_len=int(samples.shape[1]), seconds=time.perf_counter() - t0,
        peak_rss_bytes=mem.peak, rss_at_start_bytes=mem.start, activation_bytes=act_bytes,
        largest_block_bytes=largest,
        cuda_peak_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None, device=str(device),
        streaming=stream is not None, dtype=None if dtype is None else str(dtype).removeprefix("torch."),
        spilled_bytes=pool.spilled, batch_size=batch_size, resumed_blocks=start)
    return stats


def observe_block(method: Method, blk: nn.Module, prefix: str, layers: dict[str, nn.Module], X, kw: dict,
                  T=None) -> None:
    """Run the float block over every batch of ``X`` and show each linear its inputs
    (``method.observe``, from a forward pre-hook). The block's output feeds nothing here (unless
    ``T`` collects it for fine-tuning), so once the first batch has shown in which order the
    linears run, later batches stop as soon as the last of them has been observed: the last
    linear's product (a down projection) and what follows it are never computed."""
    order: list[str] = []
    last: list[str | None] = [None]  # known after the first batch

    handles = []
    for name, lin in layers.items():
        def pre(mod, args, full=f"{prefix}.{name}"):
            method.observe(full, mod, args[0])
            if last[0] is None:
                order.append(full)
            elif full == last[0]:
                raise _StopForward
        handles.append(lin.register_forward_pre_hook(pre))
    try:
        for j, x in enumerate(X):
            if j == 1 and T is None and len(order) == len(set(order)) == len(layers):
                last[0] = order[-1]  # each linear ran once: the last one ends the pass
            try:
                y = blk(x, **kw)
            except _StopForward:
                continue
            if T is not None:  # the float block's outputs: what fine-tuning aims at
                T.append(_block_output(y))
    finally:
        for h in handles:
            h.remove()


def _nonfinite(blk: nn.Module, x: Tensor, kw: dict, prefix: str, i: int, j: int, dtype) -> None:
    """Block ``i`` turned finite hidden states into NaN/Inf on batch ``j``: say where."""
    from lowbit.eval.diagnose import first_nonfinite

    where = first_nonfinite(blk, x, **kw)
    name = f"{prefix}.{where}" if where else prefix
    hint = " (float16 overflows easily: try --dtype float32 or bfloat16)" if dtype == torch.float16 else ""
    raise LowbitError(f"calibration: NaN/Inf in the output of {name} (block {i}, calibration batch {j}) after "
                      f"its layers were quantized{hint}")


def _agreed(flag: bool, split) -> bool:
    """Process 0's ``flag`` in every process (one process: ``flag``)."""
    if split is None:
        return flag
    from lowbit.core import processes

    return bool(processes.gather(lambda: flag)[0])


@torch.no_grad()
def apply_data_free(model: nn.Module, method: Method, progress: bool = True, *, device: str | torch.device = "cpu",
                    stream: Streaming | None = None) -> None:
    """Apply a method that needs no data to every linear layer of every block, in place, each
    block moved to ``device`` for the work and back (or, with ``stream``, materialized there
    from the files, written and released).

    A model outside the decoder families (an encoder such as BERT, a plain classifier) has no
    block table: there every ``nn.Linear`` of the whole model is replaced, in module order."""
    from lowbit.models.families import FAMILIES

    device = torch.device(device)
    fixed_mmap_threshold()
    prepare = getattr(method, "prepare_model", None)  # optional: see the whole model first (global pruning)
    if prepare is not None:
        if stream is not None and any(p.is_meta for p in model.parameters()):
            _check_streamable(method)
        prepare(model)
    split = distributed.Split.current()  # scale-out: None in one process
    progress = progress and (split is None or split.rank == 0)
    homes: dict[int, torch.device] = {}
    if getattr(getattr(model, "config", None), "model_type", None) not in FAMILIES:
        layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, nn.Linear)]
        if split is not None:  # scale-out: layer i solved by process i mod N, results gathered
            def ready_layer(i):
                name, lin = layers[i]
                homes[i] = lin.weight.device
                return {name: lin.to(device)}

            def finish_layer(i, solved, mine):
                name, lin = layers[i]
                home = homes.pop(i, lin.weight.device)
                lin.to(home)
                _set_submodule(model, name, solved[name].to(home))

            with tqdm(total=len(layers), desc=f"{method.name} layers", unit="layer", disable=not progress,
                      leave=False) as bar:
                distributed.apply_data_free(method, len(layers), ready_layer, finish_layer, bar)
            return
        for name, lin in tqdm(layers, desc=f"{method.name} layers", unit="layer", disable=not progress, leave=False):
            home = lin.weight.device
            q = solve_layer(method, name, lin.to(device))
            lin.to(home)
            _set_submodule(model, name, q.to(home))
        return
    blocks = find_blocks(model)

    def load(i: int) -> nn.Module:  # block i on the device, ready for the method
        if stream is not None:
            return stream.load_for_layers(block_prefix(model, i), device)
        homes[i] = next(blocks[i].parameters()).device
        return blocks[i].to(device)

    def done(i: int, blk: nn.Module) -> None:  # block i quantized: written and released, or moved back
        if stream is not None:
            stream.store(block_prefix(model, i), blk)
        else:
            blk.to(homes.pop(i))

    if split is not None:  # scale-out: block i solved by process i mod N, results gathered
        def solve_block(i):
            prefix = block_prefix(model, i)
            return {f"{prefix}.{n}": lin if stream is None else stream.layer(lin)
                    for n, lin in linear_layers(load(i)).items()}

        def finish_block(i, solved, mine):
            if stream is not None and not mine and split.rank != 0:
                return  # streamed: process 0 alone writes the blocks it did not solve
            blk = blocks[i] if mine else load(i)
            for full, new in solved.items():
                _set_submodule(model, full, new)
            done(i, blk)

        with tqdm(total=len(blocks), desc=f"{method.name} blocks", unit="block", disable=not progress,
                  leave=False) as bar:
            distributed.apply_data_free(method, len(blocks), solve_block, finish_block, bar)
        return
    for i in tqdm(range(len(blocks)), desc=f"{method.name} blocks", unit="block", disable=not progress, leave=False):
        prefix = block_prefix(model, i)
        blk = load(i)
        for name, lin in linear_layers(blk).items():
            if stream is not None:
                lin = stream.layer(lin)
            _set_submodule(blk, name, solve_layer(method, f"{prefix}.{name}", lin))
        done(i, blk)


def _check_streamable(method: Method) -> None:
    """A method that must see the whole model before changing any layer cannot stream."""
    cfg = getattr(method, "config", None)
    if getattr(cfg, "scope", None) == "global":
        raise LowbitError(f"{method.name} with scope=global ranks the weights of the whole model at once; "
                          "it cannot run streamed (drop --stream, or use the default per-layer scope)")
