"""Scale-out: one calibration run split over several processes, bit-identical to one process.

Started by torchrun (`lowbit.core.processes.init_from_env` joins the group), the sequential runner
hands three things to `Split`:

* **Batches.** The calibration samples are cut into the same batches one process would use, and
  batch j goes to process j mod N. Each process keeps only its own batches' hidden states and runs
  every block forward on them (the observation pass and the pass that feeds the next block), so
  the forward work and the activation memory are divided by N.
* **Observation.** Every linear layer of a block has one owner process, chosen by a greedy
  longest-first balance of cost ``in·(in + out)`` (the Hessian solvers' work grows with the
  columns and the rows). A layer's input is sent, batch by batch, from the process that computed
  it to the layer's owner (layers reading the same tensor — q/k/v, gate/up — need it only once
  per owner), and the owner calls ``method.observe`` on it in the very order one process would:
  batch 0, 1, 2, ... So each method accumulates its statistics exactly as it does alone — GPTQ's
  float64 running sum of per-batch x xᵀ, AWQ's token budget, Wanda's norms, static-int8's
  observers — and the result is bit-identical without any method knowing. (Summing per-process
  partial statistics with an all-reduce would not be: floating-point addition is not
  associative, and a sum over samples differs in the last bits from the one-process order.)
  Shipping the inputs rather than per-batch statistics also costs less for the usual shapes:
  tokens·in floats per batch against in² doubles for every layer.
* **Solves.** ``method.apply`` runs in the layer's owner only; the replacement modules (and the
  per-layer entries of the method's ``layer_records``, e.g. GPTQ's errors, Wanda's sparsities)
  are gathered to every process and installed in layer order, so every process ends with the
  same block before it runs its batches through it. A method whose ``transform_block`` does
  block-level work declares ``distributed_transform = True`` and splits that work itself with
  `lowbit.core.processes.share` (AWQ searches each scaling group where its statistics are and
  every process folds the shared scales).

Data-free methods have no batches: the blocks are dealt round-robin, every round of N blocks
gathered to every process. Streamed runs (``lowbit quantize --stream``) split the same way; each
process reads from the files the blocks it works on, and process 0 alone writes the checkpoint.

One-thread-per-process torchrun agrees with a multi-threaded single process when the forward
passes give the same bits on one thread as on several. For the tests' shapes they do (their GEMMs,
norms and attention do not split a reduction across threads; tests/test_distributed holds every
method to it). At real sizes MKL splits a large product's sum by thread count (measured at the
Llama-3.2-1B shape: a Hessian's X^T X over 16k tokens, a linear with 8192 inputs), so the last bits
differ; ``--reproducible`` (`lowbit.core.processes.thread_invariant_products`, MKL's strict
reproducible mode) makes products thread-count independent, in both runs. The solvers' Cholesky
factorizations (LAPACK) depend on the thread count even then, so GPTQ and SparseGPT always factor
on one thread (measured: SmolLM2's GPTQ under torchrun then equals the one-process checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.core import processes
from lowbit.errors import LowbitError
from lowbit.nn.replace import replacement


def layer_cost(module: nn.Module) -> int:
    """Relative work of solving one layer: ``in·(in + out)``."""
    n_in = getattr(module, "in_features", None)
    n_out = getattr(module, "out_features", None)
    if n_in is None or n_out is None:
        w = getattr(module, "weight", None)
        return int(w.numel()) if isinstance(w, Tensor) else 1
    return int(n_in) * (int(n_in) + int(n_out))


def balance(costs: dict[str, int], world: int) -> dict[str, int]:
    """Owner process of every item: largest cost first, each to the least-loaded process (ties:
    the earlier item, the lower rank), so every process computes the same answer."""
    order = sorted(range(len(costs)), key=lambda i: (-list(costs.values())[i], i))
    names = list(costs)
    load = [0] * world
    owner: dict[str, int] = {}
    for i in order:
        r = min(range(world), key=lambda p: (load[p], p))
        owner[names[i]] = r
        load[r] += costs[names[i]]
    return owner


def _records(method: Method, full: str) -> dict:
    out = {}
    for attr in method.layer_records:
        d = getattr(method, attr)
        if full in d:
            out[attr] = d[full]
    return out


def _install_records(method: Method, full: str, rec: dict) -> None:
    """Put a layer's entries back in every record dict, re-inserted so that each dict lists the
    layers in the order one process would have produced them."""
    for attr in method.layer_records:
        d = getattr(method, attr)
        d.pop(full, None)
        if attr in rec:
            d[full] = rec[attr]


def _dense(x: Tensor) -> bool:
    """The strides describe a permutation of a contiguous layout (rebuildable by empty_strided)."""
    if x.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(x.stride(), x.shape) if n > 1)
    expect = 1
    for s, n in dims:
        if s != expect:
            return False
        expect *= n
    return True


@dataclass
class Split:
    """This process's part of one runner pass (see the module docstring)."""

    rank: int
    world: int
    n_batches: int = 0
    _tag: int = field(default=0, repr=False)

    @classmethod
    def current(cls) -> "Split | None":
        """The split for this process, or None when the run is one process."""
        n = processes.world()
        return cls(rank=processes.rank(), world=n) if n > 1 else None

    # -- batches ---------------------------------------------------------------------------------
    def check(self, method: Method) -> None:
        if type(method).transform_block is not Method.transform_block and not method.distributed_transform:
            raise LowbitError(f"method {method.name} transforms whole blocks and does not support splitting its "
                              "work over several processes; run it in one process")

    def own_samples(self, samples: Tensor, batch_size: int) -> Tensor:
        """This process's batches (j mod world == rank), concatenated: cut again by ``batch_size``
        they are exactly the batches one process would have run (only the last can be short)."""
        n = samples.shape[0]
        starts = list(range(0, n, batch_size))
        self.n_batches = len(starts)
        mine = starts[self.rank::self.world]
        if not mine:
            return samples[:0]
        return torch.cat([samples[s:s + batch_size] for s in mine])

    def owners(self, layers: dict[str, nn.Module]) -> dict[str, int]:
        return balance({full: layer_cost(m) for full, m in layers.items()}, self.world)

    # -- observation -------------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, method: Method, layers: dict[str, nn.Module], X: list[Tensor],
                run: Callable[[Tensor], object]) -> None:
        """Run this process's batches through the block (``run``), routing every hooked layer input
        to that layer's owner, which observes the batches in global order."""
        owners = self.owners(layers)
        calls: list[tuple[str, Tensor, int]] = []
        handles = []
        for full, lin in layers.items():
            def hook(mod, args, out, full=full):
                x = args[0]
                calls.append((full, x, x._version))
            handles.append(lin.register_forward_hook(hook))
        own = iter(X)
        try:
            for step in range(math.ceil(self.n_batches / self.world)):
                calls.clear()
                has_batch = step * self.world + self.rank < self.n_batches

                def forward():
                    if not has_batch:
                        return None
                    run(next(own))
                    return self._describe(calls)

                metas = processes.gather(forward)
                received = self._transfer(metas, calls, owners)
                processes.gather(lambda: self._replay(method, layers, owners, metas, calls, received))
        finally:
            for h in handles:
                h.remove()
            calls.clear()

    @staticmethod
    def _describe(calls) -> tuple[list[tuple[str, int]], list[tuple]]:
        """(layer, input index) in hook order, and each distinct input's (shape, stride, dtype)."""
        units: list[Tensor] = []
        order = []
        for full, x, _ in calls:
            u = next((i for i, t in enumerate(units) if t is x), None)
            if u is None:
                units.append(x)
                u = len(units) - 1
            order.append((full, u))
        meta = [(tuple(x.shape), tuple(x.stride()) if _dense(x) else None, x.dtype) for x in units]
        return order, meta

    @staticmethod
    def _units(calls) -> list[Tensor]:
        units: list[Tensor] = []
        for _, x, _ in calls:
            if not any(t is x for t in units):
                units.append(x)
        return units

    def _transfer(self, metas, calls, owners) -> dict[tuple[int, int], Tensor]:
        """Point-to-point sends of each batch's layer inputs to the processes that own a layer
        reading them; every process walks the same list, so sends and receives pair up."""
        import torch.distributed as dist

        dev = processes.transport_device()
        mine = self._units(calls)
        ops, received = [], {}
        for src, meta in enumerate(metas):
            if meta is None:
                continue
            order, shapes = meta
            for u, (shape, _, dtype) in enumerate(shapes):
                dsts = sorted({owners[full] for full, uu in order if uu == u} - {src})
                for dst in dsts:
                    tag = self._tag
                    self._tag += 1
                    if src == self.rank:
                        ops.append(dist.P2POp(dist.isend, mine[u].detach().contiguous().to(dev), dst, tag=tag))
                    elif dst == self.rank:
                        buf = torch.empty(shape, dtype=dtype, device=dev)
                        ops.append(dist.P2POp(dist.irecv, buf, src, tag=tag))
                        received[(src, u)] = buf
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return received

    def _replay(self, method, layers, owners, metas, calls, received) -> None:
        """Observe, in batch order, the inputs of the layers this process owns."""
        for src, meta in enumerate(metas):
            if meta is None:
                continue
            if src == self.rank:  # this process's own batch: the hooked calls themselves
                for full, x, version in calls:
                    if owners[full] != self.rank:
                        continue
                    if x._version != version:
                        raise LowbitError(f"{full}: the block changed this layer's input in place after the "
                                          "layer read it; it cannot be observed in another process")
                    method.observe(full, layers[full], x)
                continue
            order, shapes = meta
            xs: dict[int, Tensor] = {}
            for full, u in order:
                if owners[full] != self.rank:
                    continue
                if u not in xs:
                    shape, stride, dtype = shapes[u]
                    buf = received[(src, u)].to(layers[full].weight.device)
                    if stride is not None and stride != tuple(buf.stride()):
                        xs[u] = torch.empty_strided(shape, stride, dtype=dtype, device=buf.device).copy_(buf)
                    else:
                        xs[u] = buf
                method.observe(full, layers[full], xs[u])

    # -- solves ------------------------------------------------------------------------------------
    def apply(self, method: Method, layers: dict[str, nn.Module], install: Callable[[str, nn.Module], None]) -> None:
        """``method.apply`` for the layers this process owns; every process installs every
        layer's result (in layer order) and the method's records of it."""
        owners = self.owners(layers)

        def solve():
            return {full: (replacement(lin, method.apply(full, lin)), _records(method, full))
                    for full, lin in layers.items() if owners[full] == self.rank}

        results = processes.gather(solve)
        for full in layers:
            new, rec = results[owners[full]][full]
            install(full, new)
            _install_records(method, full, rec)


def apply_data_free(method: Method, n_units: int, solve: Callable[[int], dict[str, nn.Module]],
                    finish: Callable[[int, dict[str, nn.Module], bool], None], bar=None) -> None:
    """Data-free methods over several processes. Unit i (a block, or a layer) is solved by process
    i mod N: ``solve(i)`` readies it and returns its layers, the process applies the method to
    them. Each round of N units is gathered to every process, which calls
    ``finish(i, {layer: result}, solved_here)`` for every unit in order (install, move back,
    write) and takes the method's records of the unit's layers."""
    n, r = processes.world(), processes.rank()
    for start in range(0, n_units, n):
        units = range(start, min(start + n, n_units))

        def work():
            return {i: {full: (replacement(lin, method.apply(full, lin)), _records(method, full))
                        for full, lin in solve(i).items()}
                    for i in units if i % n == r}

        results = {}
        for part in processes.gather(work):
            results.update(part)
        for i in units:
            finish(i, {full: new for full, (new, _) in results[i].items()}, i % n == r)
            for full, (_, rec) in results[i].items():
                _install_records(method, full, rec)
        if bar is not None:
            bar.update(len(units))
