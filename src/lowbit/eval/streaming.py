"""Run a causal LM over many evaluation windows one decoder block at a time.

For a model that does not fit in memory next to everything else, the forward pass is turned
inside out: instead of every block for one window, then the next window, it is every window for
one block, then the next block, so each block's weights are in memory once and only briefly::

    embed every window ──► block 0 over every window ──► block 1 ... ──► final norm + head, per window
                          (materialize, run, release)                     yields (hidden, logits)

The model is any object with ``.model`` (a transformers ``*ForCausalLM`` whose parameters may
sit on the meta device) and ``materialize(prefix, dtype, device)`` / ``release(prefix)`` that
bring one module's weights into memory and drop them again (:class:`lowbit.models.lazy.LazyModel`;
for a model already in memory :class:`InMemory` makes both no-ops).

The keyword arguments every block is called with (attention masks, rotary position embeddings)
depend only on the window length; they are captured once by the calibration runner's
:func:`~lowbit.calibration.sequential.capture_block_kwargs`, with each block temporarily replaced
by a stand-in that returns its input (so no block weights are needed for it), and the hidden
states entering block 0 by :func:`~lowbit.calibration.sequential.capture_block0_inputs`.  Every
block then sees exactly the inputs the ordinary forward would give it, window by window with
batch size 1, so the logits are bit-identical to ``model(window).logits`` in the same dtype.

The hidden states of all windows between two blocks are kept in memory up to ``budget_bytes``;
beyond that they live in two memory-mapped files in a temporary directory (``spill_dir``),
read and written window by window (byte copies, so spilling changes no bit).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from lowbit.core.memory import fixed_mmap_threshold
from lowbit.errors import LowbitError

__all__ = ["InMemory", "StreamingForward", "default_budget_bytes"]


class InMemory:
    """A model already in memory, seen through the streaming interface (no-op materialize/release)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def materialize(self, prefix: str = "", dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
        return self.model.get_submodule(prefix) if prefix else self.model

    def release(self, prefix: str = "") -> None:
        pass


def default_budget_bytes() -> int:
    """A quarter of the memory available now, at least 256 MiB."""
    from lowbit.api import available_memory

    return max(256 * 2**20, available_memory() // 4)


class _PassThrough(nn.Module):
    """Stands in for a decoder block while its call arguments are recorded: returns its input.

    Attributes the model's forward reads from its layers (e.g. ``attention_type``) are looked up
    on the real block, which is not registered as a submodule."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.__dict__["_block"] = block

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def head_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """An output layer's logits, with Gemma's soft-cap when ``softcap`` is set. A narrower
    (bf16/fp16) weight is widened for this call only: the float32 copy (2 GB for a 128k x 4096
    head) lives while the GEMM runs, not for the whole evaluation. Widening is exact and the GEMM
    is the one the model's own head runs, so the logits are the same bits."""
    logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    return _softcapped(logits, softcap)


def _softcapped(logits: Tensor, softcap: float | None) -> Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap  # as Gemma's forward


@contextmanager
def _blocks_replaced(model: nn.Module):
    from lowbit.models.families import family_of

    fam = family_of(model)
    layers = model.get_submodule(fam.blocks)
    real = list(layers)
    try:
        for i, blk in enumerate(real):
            layers[i] = _PassThrough(blk)
        yield
    finally:
        for i, blk in enumerate(real):
            layers[i] = blk


class _Activations:
    """``n`` tensors of one shape/dtype: read the current set, write the next, ``flip``.

    In memory when ``n`` of them fit in ``budget_bytes``, else two memory-mapped byte files."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, budget_bytes: int,
                 spill_dir: str | os.PathLike | None, device):
        self.n, self.shape, self.dtype, self.device = n, tuple(shape), dtype, device
        self.item_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self.total_bytes = n * self.item_bytes
        self.spilled = self.total_bytes > budget_bytes
        self._dir = None
        if self.spilled:
            if spill_dir is not None:
                os.makedirs(spill_dir, exist_ok=True)
            self._dir = tempfile.mkdtemp(prefix="lowbit-activations-", dir=spill_dir)
            try:
                self._maps = [np.memmap(os.path.join(self._dir, f"{k}.bin"), dtype=np.uint8, mode="w+",
                                        shape=(n, self.item_bytes)) for k in ("a", "b")]
            except OSError as e:
                self.close()
                raise LowbitError(f"cannot spill {self.total_bytes / 2**20:.0f} MiB of activations to "
                                  f"{spill_dir or tempfile.gettempdir()}: {e.strerror or e}") from None
        else:
            self._cur: list[Tensor | None] = [None] * n
            self._next: list[Tensor | None] = [None] * n

    def read(self, i: int) -> Tensor:
        if not self.spilled:
            return self._cur[i]
        raw = torch.from_numpy(np.array(self._maps[0][i]))
        return raw.view(self.dtype).reshape(self.shape).to(self.device)

    def write(self, i: int, t: Tensor) -> None:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise LowbitError(f"a block returned {tuple(t.shape)} {t.dtype}, expected {self.shape} {self.dtype}")
        if not self.spilled:
            self._next[i] = t
            return
        self._maps[1][i] = t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()

    def flip(self) -> None:
        if self.spilled:
            self._maps[1].flush()
            self._maps.reverse()
        else:
            self._cur, self._next = self._next, [None] * self.n

    def close(self) -> None:
        self._maps = []
        self._cur = self._next = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class StreamingForward:
    """Iterate over ``(hidden, logits)`` of every window, computed block by block (module docstring).

    ``windows``: LongTensor ``[W, ctx]``.  ``hidden`` is the output layer's input ``[1, ctx, H]``
    (after the final norm), ``logits`` ``[1, ctx, V]`` as the model's forward returns them.
    ``dtype``: the dtype the weights are materialized in (None: the files').  After iteration
    ``activation_bytes`` and ``spilled`` tell how the activations were held.
    """

    def __init__(self, lazy, windows: Tensor, *, dtype: torch.dtype | None = torch.float32,
                 device: str | torch.device = "cpu", budget_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None, progress: bool = True):
        for attr in ("model", "materialize", "release"):
            if not hasattr(lazy, attr):
                raise LowbitError(f"streaming needs an object with .model, .materialize and .release; "
                                  f"{type(lazy).__name__} has no .{attr}")
        windows = torch.as_tensor(windows)
        if windows.dim() != 2 or windows.shape[0] == 0 or windows.dtype.is_floating_point:
            raise LowbitError(f"windows must be a non-empty [n, ctx] tensor of token ids, got {tuple(windows.shape)}")
        fixed_mmap_threshold()  # large frees go back to the system (lowbit.core.memory)
        self.lazy = lazy
        self.windows = windows.to(torch.long)
        self.dtype = dtype
        self.device = torch.device(device)
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else int(budget_bytes)
        self.spill_dir = spill_dir
        self.progress = progress
        self.activation_bytes = 0
        self.spilled = False

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._run()

    @torch.no_grad()
    def _run(self) -> Iterator[tuple[Tensor, Tensor]]:
        from tqdm import tqdm

        from lowbit.calibration.sequential import (_block_output, _to, capture_block0_inputs, capture_block_kwargs,
                                                   embedding_rows)
        from lowbit.models.families import block_prefix, family_of, find_blocks

        lazy, model = self.lazy, self.lazy.model
        fam = family_of(model)
        blocks = find_blocks(model)
        outside = [fam.embed, fam.final_norm, fam.lm_head]  # the weights outside the blocks
        W = self.windows.shape[0]
        windows = self.windows.to(self.device)
        store = None
        try:
            # 1. the blocks' keyword arguments (one window through the embedding and stand-ins; the
            #    forward stops at the last block, so the final norm and the head are not needed)
            windows = embedding_rows(lazy, fam.embed, windows, self.dtype, self.device)  # the rows needed only
            with _blocks_replaced(model):
                block_kwargs = [_to(kw, self.device) for kw in capture_block_kwargs(model, windows[:1])]
            # 2. the hidden states entering block 0, for every window
            x0 = capture_block0_inputs(model, windows[:1], 1, self.device)[0]
            store = _Activations(W, tuple(x0.shape), x0.dtype, self.budget_bytes, self.spill_dir, self.device)
            self.activation_bytes, self.spilled = store.total_bytes, store.spilled
            store.write(0, x0)
            chunk = max(1, min(64, self.budget_bytes // max(store.item_bytes, 1)))
            for s in range(1, W, chunk):
                for j, x in enumerate(capture_block0_inputs(model, windows[s:s + chunk], 1, self.device)):
                    store.write(s + j, x)
            store.flip()
            lazy.release(fam.embed)
            # 3. every window through one block at a time
            bar = tqdm(blocks, desc="stream blocks", unit="block", file=sys.stderr, disable=not self.progress,
                       leave=False)
            for i, _ in enumerate(bar):
                prefix = block_prefix(model, i)
                blk = lazy.materialize(prefix, self.dtype, self.device)
                kw = block_kwargs[i]
                for j in range(W):
                    store.write(j, _block_output(blk(store.read(j), **kw)))
                lazy.release(prefix)
                store.flip()
            bar.close()
            # 4. final norm and output layer, one window at a time
            # (a float output layer for float32 compute stays in its files' dtype, bf16 say, and is
            # widened per window: the same logits, without a float32 copy held throughout)
            norm = lazy.materialize(fam.final_norm, self.dtype, self.device)
            head = lazy.materialize(fam.lm_head, None if self.dtype == torch.float32 else self.dtype, self.device)
            cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
            for j in range(W):
                hidden = norm(store.read(j))
                if type(head) is nn.Linear:
                    logits = head_logits(hidden, head.weight, head.bias, cap)
                else:  # a quantized output layer
                    logits = _softcapped(head(hidden), cap)
                yield hidden, logits
        finally:
            if store is not None:
                store.close()
            for p in outside:
                lazy.release(p)
