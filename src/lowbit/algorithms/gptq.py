"""GPTQ: accurate post-training quantization for generative transformers (Frantar et al., 2022).

Each linear layer y = W x is quantized one input column at a time, and the rounding error of a
column is pushed onto the columns not yet quantized so as to minimise the layer's output error on
calibration inputs X = [x_1 ... x_n]:

    argmin_Q  ||W X - Q X||²_F  =  tr((W - Q) H (W - Q)ᵀ) · n/2,      H = 2/n Σ_k x_k x_kᵀ   (eq. 1)

Optimal Brain Quantization (OBQ, the paper's eq. 2-3) for one row w with the set F of
not-yet-quantized columns, after quantizing column q:

    δ_F  = -(w_q - quant(w_q)) / [H_F⁻¹]_qq · (H_F⁻¹)_{:,q}                                 (eq. 2)
    H_{-q}⁻¹ = (H⁻¹ - 1/[H⁻¹]_qq · H⁻¹_{:,q} H⁻¹_{q,:})_{-q}                              (eq. 3)

GPTQ makes this fast and stable (paper §3, Algorithm 1):

* one fixed column order for all rows ("arbitrary order" insight), so H_F⁻¹ is shared;
* the successive H_F⁻¹ rows that eq. 3 would produce are exactly the rows of the *upper Cholesky
  factor* of H⁻¹ (scaled), computed once ("Cholesky reformulation", step 3);
* updates are applied lazily: within a block of `block_size` columns immediately, to the rest of
  the matrix once per block with a single matrix product ("lazy batch updates", step 2);
* dampening: λ = damp · mean(diag H) is added to the diagonal (§3 step 3).

Additions that the reference implementation made standard and lowbit keeps:

* dead inputs (diag H = 0, never active in calibration): their weight columns are zeroed and
  diag H set to 1 (they cannot affect the output on the calibration data);
* ``act_order``: columns are quantized in order of descending diag H (largest activations first);
* group quantization follows lowbit's layout (``group_size`` consecutive *original* input columns
  per row, a shorter last group allowed), so the packed result is a plain AffineWeight. Without
  act_order the qparams of a group are chosen from the current (already error-updated) weights of
  the group when its first column is reached. With act_order a group's columns are visited out of
  order, so its qparams must exist before its first column is quantized: lowbit then requires
  ``static_groups=True`` (qparams from the original weights before the permutation, as the
  reference's ``static_groups`` option). ``static_groups=True`` without act_order does the same.
  Per-channel and per-tensor qparams are always chosen once, from the original weights.

Nothing but standard affine dequantization is needed at inference: the result is an AffineWeight.

GPTQ onto a GGUF block type (``gguf_type``, e.g. "Q4_K"): instead of lowbit's affine grid, each
layer is solved onto the grid of that llama.cpp block type (`lowbit.export.gguf_grid.gptq_onto`):
the type's own quantizer, weighted by the layer's importance (diag H), fixes every block's scales,
then GPTQ chooses the codes on those fixed grids (a layer whose rows are not whole blocks of the type
gets llama.cpp's fallback type, as GGUF export would give it: Q4_K -> Q5_0, ...). The layer becomes a
`lowbit.formats.gguf_blocks.GGUFBlockWeight` that GGUF export writes byte for byte. ``scheme``
and ``static_groups`` are then unused, and ``incoherent`` is refused (a GGUF file holds W itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lowbit.algorithms.base import Method
from lowbit.algorithms.hessian import (  # noqa: F401 (inverse_hessian_factor: named here by the tests)
    AffineGrid,
    check_solver_inputs,
    column_order,
    gptq_columns,
    hessian_error,
    inverse_hessian_factor,
    permuted_inverse_factor,
)
from lowbit.core.grid import check_finite, choose_qparams, group_layout, qparams_from_range, round_to_grid
from lowbit.core.hadamard import Incoherence, hadamard_factors, layer_seed
from lowbit.core.registry import register_method
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.formats.incoherent import IncoherentAffineWeight
from lowbit.formats.base import WeightFormat


@dataclass(frozen=True)
class GPTQConfig:
    scheme: QuantScheme = field(default_factory=QuantScheme)  # int4 symmetric, group 128
    block_size: int = 128       # columns per lazy batch update (Alg. 1 "B")
    damp: float = 0.01          # λ = damp · mean(diag H)
    act_order: bool = True      # quantize columns by descending diag H
    static_groups: bool = True  # group qparams from the original weights (required with act_order)
    incoherent: bool = False    # solve on U W V^T and V H V^T (QuIP's incoherence processing; see `GPTQ.apply`)
    seed: int = 0               # with the layer's name: the seed of the incoherence transforms
    gguf_type: str | None = None  # solve onto this GGUF block type's grid (see `GPTQ.apply`); the scheme is then unused

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, QuantScheme):
            raise LowbitError(f"GPTQ scheme must be a QuantScheme, got {type(self.scheme).__name__}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise LowbitError(f"GPTQ block_size must be a positive integer, got {self.block_size!r}")
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float))
                or not math.isfinite(self.damp) or self.damp <= 0):
            raise LowbitError(f"GPTQ damp must be a finite number > 0, got {self.damp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise LowbitError(f"GPTQ seed must be an integer in [0, 2^31), got {self.seed!r}")
        for name in ("act_order", "static_groups", "incoherent"):
            if not isinstance(getattr(self, name), bool):
                raise LowbitError(f"GPTQ {name} must be true or false, got {getattr(self, name)!r}")
        if self.gguf_type is not None:
            from lowbit.export.gguf_grid import SUPPORTED

            if self.gguf_type not in SUPPORTED:
                raise LowbitError(f"GPTQ gguf_type must be one of {', '.join(SUPPORTED)}, got {self.gguf_type!r}")
            if self.incoherent:
                raise LowbitError("GPTQ gguf_type cannot be combined with incoherent=true: a GGUF file holds "
                                  "the weight itself, not its incoherence-transformed form")
        if (self.gguf_type is None and self.act_order and self.scheme.granularity == "group"
                and not self.static_groups):
            raise LowbitError("GPTQ act_order with group quantization needs static_groups=True "
                              "(lowbit groups are consecutive input columns)")


def gptq_quantize(W: Tensor, H: Tensor, cfg: GPTQConfig, *,
                  dtype: torch.dtype = torch.float32) -> tuple[AffineWeight, dict]:
    """Pure solver (paper Algorithm 1). W [out, in] weights, H [in, in] = 2/n Σ x xᵀ.

    Returns the packed AffineWeight and ``info``: ``error`` = tr((W - Q) H (W - Q)ᵀ) with the H
    given (the Hessian-weighted output error that GPTQ minimises), ``dead_columns`` and ``lambda``
    (the dampening added). ``dtype`` is the precision of the solve (float64 for tests).
    """
    scheme = cfg.scheme
    check_solver_inputs(W, H, "GPTQ")
    rows, cols = W.shape
    W_in, H_in = W, H
    W = W.detach().to(dtype).clone()                              # [out, in]

    perm, dead = column_order(H, cfg.act_order, W.device, dtype)
    W[:, dead] = 0.0

    # Quantization grid. Static: all qparams now, from the original weights. Dynamic (group, no
    # act_order): filled in below when each group's first column is reached.
    n_groups, g = group_layout((rows, cols), scheme)
    per_group = scheme.granularity == "group"
    static = not per_group or cfg.static_groups
    if static:
        scale, zero = choose_qparams(W, scheme)                   # [out, n_groups] ([1, 1] per-tensor)
        scale = scale.to(W)
        zero = None if zero is None else zero.to(W)
    else:
        scale = W.new_zeros(rows, n_groups)
        zero = None if scheme.symmetric else W.new_zeros(rows, n_groups)

    W = W[:, perm]
    group_of = (perm // g).tolist() if per_group else [0] * cols  # position -> group of its column
    Hinv, lam = permuted_inverse_factor(H, perm, dead, cfg.damp, "GPTQ", dtype)  # [in, in]

    Qint = torch.empty(rows, cols, dtype=torch.int32, device=W.device)  # integers, visiting order

    def quantize(j: int, w: Tensor, current) -> Tensor:
        gi = group_of[j]
        if not static and j % g == 0:
            # a group starts: qparams from its current weights
            cur = current(min(j + g, cols))
            s, z = qparams_from_range(cur.amin(dim=1), cur.amax(dim=1), scheme)
            scale[:, gi] = s.to(W)
            if zero is not None:
                zero[:, gi] = z.to(W)
        q, w_hat = round_to_grid(w, scale[:, gi], None if zero is None else zero[:, gi], scheme)
        Qint[:, j] = q.to(torch.int32)
        return w_hat

    def begin(j: int, current) -> None:  # the native loop's group start: the same qparams fit
        cur = current(min(j + g, cols))
        s, z = qparams_from_range(cur.amin(dim=1), cur.amax(dim=1), scheme)
        scale[:, group_of[j]] = s.to(W)
        if zero is not None:
            zero[:, group_of[j]] = z.to(W)

    grid = AffineGrid(scale, zero, scheme.zero_point == "float", torch.tensor(group_of, dtype=torch.int64),
                      float(scheme.qmin), float(scheme.qmax), Qint,
                      frozenset() if static else frozenset(range(0, cols, g)), None if static else begin)
    Q = gptq_columns(W, Hinv, cfg.block_size, quantize, grid)            # dequantized, visiting order

    del Hinv, W                  # freed before the result's copies are made
    inv = torch.argsort(perm)
    fmt = AffineWeight.from_integers(Qint[:, inv], scale, zero, scheme)
    del Qint
    D = W_in.detach().to(dtype) - Q[:, inv]                                    # [out, in]
    del Q
    info = {"error": hessian_error(D, H_in), "dead_columns": int(dead.sum()), "lambda": float(lam)}
    return fmt, info


_WHOLE_PRODUCT_BYTES = 64 << 20  # a float32 x xᵀ above this is made in column blocks
_COLUMNS = 1024                  # columns per block then
_ROWS_BYTES = 16 << 20           # float64 bytes widened at once by _widening_add


def _widening_add(acc: Tensor, part: Tensor) -> None:
    """acc += part.double(), exactly, a few rows at a time: an add of mixed dtypes makes a
    float64 copy of its whole operand, which for an 8192² product is 512 MB."""
    rows = max(1, _ROWS_BYTES // (8 * max(1, part.shape[1])))
    for i in range(0, part.shape[0], rows):
        acc[i:i + rows].add_(part[i:i + rows])


@register_method("gptq")
class GPTQ(Method):
    """Accumulates Σ x xᵀ and the token count per layer; solves with `gptq_quantize` on apply.

    Each batch's x xᵀ is one float32 product, accumulated across batches in float64. Layers fed
    the very same input tensor in every batch (q/k/v, gate/up) hold one sum between them: the
    product is made once and added once. A layer that stops seeing its group's input leaves the
    group with a copy of the sum so far, so every layer's sum is exactly the sum of its own
    batches' products either way. The sums and counts are what `statistics()` exposes."""

    config_cls = GPTQConfig
    needs_calibration = True
    layer_records = ("errors",)

    def __init__(self, config: GPTQConfig):
        super().__init__(config)
        self._group: dict[str, int] = {}    # layer -> id of the sum it is counted in
        self._sums: dict[int, list] = {}    # id -> [Σ x xᵀ [in, in] float64, tokens int64 [1], {layers}]
        self._pending: list | None = None   # [x, x._version, x xᵀ float32 or None, [layers]]: the latest input
        self._ids = 0
        self.errors: dict[str, float] = {}  # layer -> info["error"] of its solve

    def observe(self, layer_name: str, module: nn.Linear, x: Tensor) -> None:
        if x.shape[-1] != module.in_features:
            raise LowbitError(f"{layer_name}: input has {x.shape[-1]} features, layer expects {module.in_features}")
        p = self._pending
        if p is not None and p[0] is x and p[1] == x._version and layer_name not in p[3]:
            p[3].append(layer_name)         # the same input as the layer before: nothing to compute
            return
        self._flush()
        n = x.shape[-1]
        X = x.detach().reshape(-1, n).float()                                  # [tokens, in]
        # a wide input's product (a large model's down projection, 8192² floats) is made when it
        # is added, in column blocks, never whole
        self._pending = [x, x._version, None if n * n * 4 > _WHOLE_PRODUCT_BYTES else X.T @ X, [layer_name]]

    def _flush(self) -> None:
        """Add the pending product to the sum of every group of layers that saw it."""
        p, self._pending = self._pending, None
        if p is None:
            return
        x, version, xxT, layers = p
        if x._version != version:
            raise LowbitError(f"the input of {layers[0]} was modified in place after the layer ran")
        seen = set(layers)
        targets = []
        for gid in sorted({self._group[l] for l in layers if l in self._group}):
            entry = self._sums[gid]
            if entry[2] <= seen:
                targets.append(entry)
            else:                             # only some of the group saw it: those leave with a copy
                inside = entry[2] & seen
                entry[2] -= inside
                targets.append(self._new_sum(entry[0].clone(), entry[1].clone(), inside))
        n = x.shape[-1]
        fresh = [l for l in layers if l not in self._group]
        if fresh:
            targets.append(self._new_sum(torch.zeros(n, n, dtype=torch.float64, device=x.device),
                                         torch.zeros(1, dtype=torch.int64, device=x.device), set(fresh)))
        for entry in targets:
            entry[1] += x.numel() // n
        if xxT is not None:
            for entry in targets:
                _widening_add(entry[0], xxT)
            return
        X = x.detach().reshape(-1, n).float()
        for j in range(0, n, _COLUMNS):
            part = X.T @ X[:, j:j + _COLUMNS]                                  # [in, columns]
            for entry in targets:
                _widening_add(entry[0][:, j:j + _COLUMNS], part)

    def _new_sum(self, total: Tensor, tokens: Tensor, layers: set) -> list:
        self._ids += 1
        entry = [total, tokens, layers]
        self._sums[self._ids] = entry
        for l in layers:
            self._group[l] = self._ids
        return entry

    def statistics(self) -> dict[str, Tensor]:
        self._flush()
        out = {}
        for name, gid in self._group.items():
            out[f"{name}.xxT"] = self._sums[gid][0]
            out[f"{name}.count"] = self._sums[gid][1]
        return out

    def take_hessian(self, layer_name: str, who: str = "GPTQ") -> Tensor:
        """H = 2/n Σ x xᵀ of one layer (float64, the caller's to keep or overwrite); the layer's
        statistics are dropped (its group's sum is freed with its last layer)."""
        self._flush()
        gid = self._group.get(layer_name)
        if gid is None or int(self._sums[gid][1].item()) == 0:
            raise LowbitError(f"{who} saw no calibration inputs for {layer_name}")
        total, tokens, layers = self._sums[gid]
        del self._group[layer_name]
        layers.discard(layer_name)
        n = int(tokens.item())
        if layers:
            return total * (2.0 / n)
        del self._sums[gid]
        return total.mul_(2.0 / n)

    def describe(self) -> dict:
        """The record of the settings; without incoherence processing its seed means nothing,
        and both are left out, as is an unset gguf_type (so records of plain GPTQ stay as they
        were before the options)."""
        d = super().describe()
        if isinstance(self.config, GPTQConfig) and not self.config.incoherent:
            for k in ("incoherent", "seed"):
                d["config"].pop(k, None)
        if isinstance(self.config, GPTQConfig) and self.config.gguf_type is None:
            d["config"].pop("gguf_type", None)
        return d

    def apply(self, layer_name: str, module: nn.Linear) -> WeightFormat:
        check_finite(module.weight, layer_name)
        # rounded to the solve's float32 here so that the float64 sum is freed before the solve's
        # copies exist (the solver would round it to the same values)
        H = self.take_hessian(layer_name).float()
        if self.config.gguf_type is not None:
            # GPTQ onto the GGUF type's grid: its encoder fixes the scales (weighted by diag H, the
            # layer's importance matrix), GPTQ chooses the codes; the blocks are kept as they are
            # (rows that are not whole blocks of the type take llama.cpp's fallback type, as export does)
            from lowbit.export.gguf import fit_row
            from lowbit.export.gguf_grid import SUPPORTED, gptq_onto
            from lowbit.formats.gguf_blocks import GGUFBlockWeight

            cfg = self.config
            gtype = fit_row(cfg.gguf_type, module.in_features)
            if gtype not in SUPPORTED:
                raise LowbitError(f"{layer_name}: rows of {module.in_features} fit neither {cfg.gguf_type} nor its "
                                  f"fallback type; GPTQ gguf_type cannot solve this layer")
            raw, info = gptq_onto(module.weight, H, gtype, damp=cfg.damp, block_size=cfg.block_size,
                                  act_order=cfg.act_order)
            self.errors[layer_name] = info["error"]
            return GGUFBlockWeight.from_raw(torch.from_numpy(raw).to(module.weight.device), gtype,
                                            tuple(module.weight.shape))
        if not self.config.incoherent:
            fmt, info = gptq_quantize(module.weight, H, self.config)
            self.errors[layer_name] = info["error"]
            return fmt
        # incoherence processing (QuIP): the grid is fitted to W~ = U W V^T, whose outliers the
        # random Hadamard transforms spread out, with the matching Hessian V H V^T; the error is
        # the same in either basis (the transforms are orthogonal)
        seed = layer_seed(self.config.seed, layer_name)
        out, n = module.weight.shape
        if hadamard_factors(out) is None or hadamard_factors(n) is None:
            raise LowbitError(f"{layer_name}: GPTQ incoherent=true needs Hadamard-factorisable widths "
                              f"(b * 2^r with a Paley base b); this layer is {out} x {n}")
        inc = Incoherence.for_shape(out, n, seed)
        Wt = inc.weight(module.weight.detach().float())
        Ht = inc.hessian(H)
        del H
        fmt, info = gptq_quantize(Wt, Ht, self.config)
        self.errors[layer_name] = info["error"]
        return IncoherentAffineWeight.wrap(fmt, seed)
