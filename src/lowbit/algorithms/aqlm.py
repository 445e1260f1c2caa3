"""AQLM: extreme compression of LLMs via additive quantization (Egiazarian et al., 2024).

Each row of a linear layer's weight ``W [out, in]`` is cut into groups of ``g`` consecutive
weights; a group is coded as the sum of one vector from each of ``M`` learned codebooks of
``K = 2^B`` vectors, times the row's scale (`lowbit.formats.aqlm`):

    W^[o, J_j] = s_o · Σ_m C_m[b_ojm]                       J_j = columns j·g .. (j+1)·g - 1

``M·B / g`` bits per weight for the codes (the paper's "2x8" with g = 8 is 2 bits). The codes,
codebooks and scales minimise the layer's output error on the calibration inputs (paper eq. 2,
the Hessian H = 2/n Σ x xᵀ accumulated exactly as GPTQ does, damped by λ = damp · mean diag H):

    L(b, C, s) = ||W X - W^ X||²  ∝  tr((W - W^) H (W - W^)ᵀ)                           (eq. 2)

Rows are independent in L (each has its own scale and its own codes). The solver (paper Alg. 1)
alternates, for ``rounds`` rounds:

1. **codebooks** (paper §3.2 "codebook update"): W^ is linear in C for fixed codes and scales, so
   L is a quadratic in C whose minimum is a least-squares problem over the M·K·g entries; it is
   approached with ``codebook_steps`` preconditioned conjugate-gradient steps with exact line
   search (each step lowers L). The paper takes Adam steps on the same objective.
2. **scales**: for fixed codes and codebooks each row's best scale is closed form
   (s_o = uᵀ H w / uᵀ H u with u the row's unscaled reconstruction).
3. **codes** by beam search (paper §3.2 "beam search"), one input group at a time with the other
   groups of every row held fixed. With G = (W - W^) H the current residual times H, the part
   of L that depends on group j's reconstruction v = s Σ_m C_m[b_m] of a row is

       L_j(v) = vᵀ A v - 2 vᵀ y + const,     A = H[J_j, J_j],   y = A v_cur + G[:, J_j]      (eq. 5)

   (the group's Hessian block plus the cross term with the rest of the row's residual). The beam
   starts from the current codes; each of M steps replaces one codebook's code of every beam
   member by each of the K vectors (scored with one matrix product per codebook), keeping the
   ``beam_size`` best distinct code tuples. The best tuple replaces the current one only where it
   lowers L_j (checked in float64), so a code step never increases L; G is updated after each
   group.

Codebooks and scales are kept in the storage dtype (float16 by default) from the first code step
on: the codes are chosen against the values that are stored. Codebooks start from residual
k-means (paper §3.1) on the groups of W / s (s = the rows' RMS).

Block fine-tuning (paper §3.3, with PV-tuning's discrete step): with ``finetune_steps > 0`` the
calibration runner calls `AQLM.tune_block` once every layer of a block is quantized: the block's
codebooks, scales and norm gains are trained by the shared block trainer
(`lowbit.algorithms.block_tune`) towards the float block's outputs, then each layer's codes are
searched again against the tuned codebooks (accepted only where they lower the layer's own L);
each step is kept only if it lowers the block's error on a held-out calibration batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.hessian import _one_cpu_thread, check_solver_inputs
from lowbit.core.grid import check_finite
from lowbit.core.hadamard import layer_seed
from lowbit.core.registry import register_method
from lowbit.errors import LowbitError
from lowbit.formats.aqlm import MAX_CODEBOOKS, AQLMWeight, reconstruct
from lowbit.training.tunable import TunableAQLM

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_ELEMENTS = 1 << 22  # float32 candidate scores made at once by the beam search (16 MB)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class AQLMConfig:
    bits: int = 2                 # code bits per weight: M = bits · g / B unless num_codebooks is set
    num_codebooks: int = 0        # M, the number of codebooks (0: from bits)
    nbits_per_codebook: int = 8   # B: 2^B vectors per codebook
    in_group_size: int = 8        # g: weights per group
    beam_size: int = 4            # code tuples kept by the beam search
    rounds: int = 3               # alternations of (codebooks, scales, codes)
    codebook_steps: int = 8       # conjugate-gradient steps on the codebooks per round
    kmeans_iters: int = 12        # Lloyd iterations of the initial residual k-means
    kmeans_points: int = 16384    # groups the k-means is fitted on (evenly sampled; all are then coded)
    damp: float = 0.01            # λ = damp · mean(diag H)
    seed: int = 0                 # with the layer's name: the k-means sample
    dtype: str = "float16"        # of the stored codebooks and scales
    finetune_steps: int = 0       # Adam steps per block on codebooks and scales (0: no block fine-tuning)
    finetune_lr: float = 1e-4     # their learning rate

    def __post_init__(self) -> None:
        for name, lo in (("bits", 1), ("num_codebooks", 0), ("nbits_per_codebook", 1), ("in_group_size", 1),
                         ("beam_size", 1), ("rounds", 0), ("codebook_steps", 0), ("kmeans_iters", 0),
                         ("kmeans_points", 1), ("finetune_steps", 0)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise LowbitError(f"AQLM {name} must be an integer >= {lo}, got {v!r}")
        if self.nbits_per_codebook > 16:
            raise LowbitError(f"AQLM nbits_per_codebook must be at most 16, got {self.nbits_per_codebook}")
        if self.num_codebooks == 0:
            M, rest = divmod(self.bits * self.in_group_size, self.nbits_per_codebook)
            if rest or M < 1:
                raise LowbitError(f"AQLM bits={self.bits} with groups of {self.in_group_size} is not a whole number of "
                                  f"{self.nbits_per_codebook}-bit codebooks; set num_codebooks")
            object.__setattr__(self, "num_codebooks", M)
        if self.num_codebooks > MAX_CODEBOOKS:
            raise LowbitError(f"AQLM num_codebooks must be at most {MAX_CODEBOOKS}, got {self.num_codebooks}")
        if not _is_number(self.damp) or self.damp < 0:
            raise LowbitError(f"AQLM damp must be a finite number >= 0, got {self.damp!r}")
        if not _is_number(self.finetune_lr) or self.finetune_lr <= 0:
            raise LowbitError(f"AQLM finetune_lr must be a finite number > 0, got {self.finetune_lr!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**31:
            raise LowbitError(f"AQLM seed must be an integer in [0, 2^31), got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise LowbitError(f"AQLM dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def code_bits(self) -> float:
        """Bits per weight of the codes alone."""
        return self.num_codebooks * self.nbits_per_codebook / self.in_group_size


# ---------------------------------------------------------------------------------------------
# W^ and its adjoint; the objective
# ---------------------------------------------------------------------------------------------

def _adjoint(Y: Tensor, b: Tensor, s: Tensor, K: int) -> Tensor:
    """The adjoint of C -> reconstruct(C, b, s) applied to Y [out, in]: [M, K, g]."""
    out, groups, M = b.shape
    g = Y.shape[1] // groups
    Ys = (Y.reshape(out, groups, g) * s.to(Y.dtype)[:, None, None]).reshape(-1, g)
    R = Y.new_zeros(M, K, g)
    for m in range(M):
        R[m].index_add_(0, b[..., m].reshape(-1), Ys)
    return R


def objective(W: Tensor, What: Tensor, H: Tensor) -> float:
    """tr((W - W^) H (W - W^)ᵀ) in float64."""
    D = W.double() - What.double()
    return float(((D @ H.double()) * D).sum())


# ---------------------------------------------------------------------------------------------
# initialisation: residual k-means
# ---------------------------------------------------------------------------------------------

def _nearest(X: Tensor, C: Tensor) -> Tensor:
    """Index of the nearest row of C [K, g] for every row of X [N, g]."""
    cc = (C * C).sum(1)
    rows = max(1, _ELEMENTS // C.shape[0])
    return torch.cat([torch.addmm(cc, X[i:i + rows], C.T, beta=1, alpha=-2).argmin(1)
                      for i in range(0, X.shape[0], rows)])


def kmeans(X: Tensor, K: int, iters: int, points: int, gen: torch.Generator) -> Tensor:
    """K centroids [K, g] of X [N, g]: Lloyd's iterations on at most ``points`` evenly spaced rows,
    from centroids drawn among them (with repeats when there are fewer than K)."""
    N = X.shape[0]
    sample = X if N <= points else X[torch.linspace(0, N - 1, points).round().long()]
    n = sample.shape[0]
    first = torch.randperm(n, generator=gen)[:K] if n >= K else torch.randint(n, (K,), generator=gen)
    C = sample[first].clone()
    for _ in range(iters):
        a = _nearest(sample, C)
        counts = torch.bincount(a, minlength=K).to(C.dtype)
        sums = torch.zeros_like(C).index_add_(0, a, sample)
        used = counts > 0
        C[used] = sums[used] / counts[used, None]
    return C


def initialise(W: Tensor, M: int, K: int, g: int, cfg: AQLMConfig, gen: torch.Generator
               ) -> tuple[Tensor, Tensor, Tensor]:
    """(C [M, K, g], b [out, groups, M], s [out]) float64: s the rows' RMS, C by residual k-means
    on the groups of W / s, b the nearest vector of each codebook in turn."""
    out, n = W.shape
    s = W.pow(2).mean(1).sqrt()
    s = torch.where(s > 0, s, torch.ones_like(s))
    X = (W / s[:, None]).reshape(-1, g).float()                       # [out·groups, g]
    C = torch.empty(M, K, g, dtype=torch.float32)
    b = torch.empty(out * (n // g), M, dtype=torch.int64)
    for m in range(M):
        C[m] = kmeans(X, K, cfg.kmeans_iters, cfg.kmeans_points, gen)
        b[:, m] = _nearest(X, C[m])
        X = X - C[m][b[:, m]]
    return C.double(), b.reshape(out, n // g, M), s


# ---------------------------------------------------------------------------------------------
# step 1: codebooks (least squares by conjugate gradients)
# ---------------------------------------------------------------------------------------------

def update_codebooks(W: Tensor, H: Tensor, C: Tensor, b: Tensor, s: Tensor, steps: int) -> Tensor:
    """Codebooks lowering tr((W - W^) H (W - W^)ᵀ) for fixed codes and scales: ``steps``
    preconditioned conjugate-gradient steps (Jacobi on the group-diagonal part of the normal
    matrix) with exact line search, in float32. Returns float64 codebooks (the caller rounds and
    checks them)."""
    M, K, g = C.shape
    out, groups, _ = b.shape
    Hf = H.float()
    sf = s.float()
    theta = C.float().clone()
    D = W.float() - reconstruct(theta, b, sf)                            # [out, in]
    DH = D @ Hf
    r = _adjoint(DH, b, sf, K)                                           # -1/2 the gradient
    diag = _adjoint((sf * sf)[:, None].expand(out, W.shape[1]) * Hf.diagonal()[None, :], b,
                    torch.ones_like(sf), K)
    diag = torch.where(diag > 0, diag, torch.ones_like(diag))
    z = r / diag
    d = z.clone()
    rz = float((r.double() * z).sum())
    for _ in range(steps):
        Delta = reconstruct(d, b, sf)
        DeltaH = Delta @ Hf
        kappa = float((Delta.double() * DeltaH).sum())
        rd = float((r.double() * d).sum())
        if not kappa > 0 or rd <= 0:
            break
        alpha = rd / kappa
        theta.add_(d, alpha=alpha)
        DH.sub_(DeltaH, alpha=alpha)
        r = _adjoint(DH, b, sf, K)
        z_new = r / diag
        rz_new = float((r.double() * z_new).sum())
        beta = max(0.0, (rz_new - float((r.double() * z).sum())) / rz) if rz > 0 else 0.0  # Polak-Ribière+
        d = z_new + beta * d
        z, rz = z_new, rz_new
    return theta.double()


# ---------------------------------------------------------------------------------------------
# step 2: scales (closed form per row)
# ---------------------------------------------------------------------------------------------

def update_scales(W: Tensor, H: Tensor, C: Tensor, b: Tensor, s: Tensor, store) -> Tensor:
    """Each row's scale minimising its term of the objective for fixed codes and codebooks,
    rounded by ``store``; a row keeps its scale where the rounded new one is not better."""
    U = reconstruct(C, b, torch.ones_like(s))                            # [out, in] unscaled
    UH = U @ H
    a = (UH * U).sum(1)
    c = (UH * W).sum(1)
    new = store(torch.where(a > 0, c / torch.where(a > 0, a, torch.ones_like(a)), s))

    def row_loss(t: Tensor) -> Tensor:  # the row's objective up to wᵀHw
        return t * t * a - 2 * t * c

    return torch.where(row_loss(new) < row_loss(s), new, s)


# ---------------------------------------------------------------------------------------------
# step 3: codes (beam search, one input group at a time)
# ---------------------------------------------------------------------------------------------

def _vectors(C: Tensor, codes: Tensor) -> Tensor:
    """Σ_m C_m[codes[..., m]]: codes [..., M] -> [..., g]."""
    V = C[0][codes[..., 0]]
    for m in range(1, C.shape[0]):
        V = V + C[m][codes[..., m]]
    return V


@functools.lru_cache(maxsize=None)
def _before(T: int) -> Tensor:
    """[T, T] bool, true where the column comes before the row."""
    return torch.ones(T, T, dtype=torch.bool).tril(-1)


def _top(Z: Tensor, Caug: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k smallest of Z @ Caug [rows, K] per row (values, indices), K taken in chunks."""
    K = Caug.shape[1]
    chunk = max(k, min(K, _ELEMENTS // max(1, Z.shape[0])))
    vals, idx = [], []
    for k0 in range(0, K, chunk):
        scores = Z @ Caug[:, k0:k0 + chunk]
        if k == 1:
            v, i = scores.min(1, keepdim=True)
        else:
            v, i = scores.topk(min(k, scores.shape[1]), dim=1, largest=False)
        vals.append(v)
        idx.append(i + k0)
    v, i = torch.cat(vals, 1), torch.cat(idx, 1)
    if len(vals) == 1:
        return v, i
    v, j = v.topk(k, dim=1, largest=False)
    return v, i.gather(1, j)


def beam_search_group(C: Tensor, Caug: list[Tensor], A: Tensor, s: Tensor, y: Tensor, codes: Tensor,
                      beam: int) -> Tensor:
    """Codes [R, M] of R rows' group minimising L_j(v) = vᵀ A v - 2 vᵀ y, v = s Σ_m C_m[b_m]
    (eq. 5; float32): a beam of ``beam`` distinct code tuples, started from ``codes``, M steps of
    changing one codebook's code of each member. Caug[m] = [C_mᵀ; 1; q_m] [g + 2, K] with
    q_m[k] = C_m[k]ᵀ A C_m[k], so that one product scores every replacement."""
    M, K, g = C.shape
    R = codes.shape[0]
    sc = s[:, None, None]
    beam_codes = codes[:, None, :]                                       # [R, w, M]
    V = _vectors(C, beam_codes) * sc
    cost = ((V @ A) * V).sum(-1) - 2 * (V * y[:, None, :]).sum(-1)      # [R, w]
    kk = min(beam, K)
    for _ in range(M):
        w = beam_codes.shape[1]
        V = _vectors(C, beam_codes) * sc                                 # [R, w, g]
        dead = torch.isinf(cost)
        costs, tuples = [], []
        for m in range(M):
            P = V - C[m][beam_codes[..., m]] * sc                        # the member without codebook m
            AP = P @ A
            base = (P * AP).sum(-1) - 2 * (P * y[:, None, :]).sum(-1)    # [R, w]
            z = 2 * sc * (AP - y[:, None, :])
            Z = torch.cat([z, base[..., None], (s * s)[:, None, None].expand(R, w, 1)], -1).reshape(R * w, g + 2)
            v, k = _top(Z, Caug[m], kk)                                  # [R·w, kk]
            v = v.reshape(R, w, kk).masked_fill(dead[..., None], math.inf)
            t = beam_codes[:, :, None, :].expand(R, w, kk, M).clone()
            t[..., m] = k.reshape(R, w, kk)
            costs.append(v.reshape(R, w * kk))
            tuples.append(t.reshape(R, w * kk, M))
        cand, cand_codes = torch.cat(costs, 1), torch.cat(tuples, 1)
        T = min(2 * beam, cand.shape[1])
        cand, order = cand.topk(T, dim=1, largest=False)                 # sorted, best first
        cand_codes = cand_codes.gather(1, order[..., None].expand(R, T, M))
        same = (cand_codes[:, :, None, :] == cand_codes[:, None, :, :]).all(-1)
        dup = (same & _before(T)).any(-1)                                # a better copy comes first
        cand = cand.masked_fill(dup, math.inf)
        cost, order = cand.topk(min(beam, T), dim=1, largest=False)
        beam_codes = cand_codes.gather(1, order[..., None].expand(R, order.shape[1], M))
    return beam_codes[:, 0]


def update_codes(W: Tensor, H: Tensor, C: Tensor, b: Tensor, s: Tensor, beam: int) -> tuple[Tensor, int]:
    """One sweep of beam search over the input groups (eq. 5), every row at once; a group's
    codes change only where the new ones lower the objective (float64). Returns (codes, number of
    groups changed). W, H, C, s float64."""
    out, groups, M = b.shape
    K, g = C.shape[1], C.shape[2]
    b = b.clone()
    Cf = C.float()
    sf = s.float()
    G = (W - reconstruct(C, b, s)) @ H                                   # [out, in] residual · H
    changed = 0
    rows = max(1, _ELEMENTS // (beam * min(K, 4096)))
    for j in range(groups):
        J = slice(j * g, (j + 1) * g)
        A = H[J, J]
        Af = A.float()
        Caug = [torch.cat([Cf[m].T, torch.ones(1, K), ((Cf[m] @ Af) * Cf[m]).sum(1)[None]]) for m in range(M)]
        v_cur = _vectors(C, b[:, j]) * s[:, None]                       # [out, g]
        y = v_cur @ A + G[:, J]
        new = torch.cat([beam_search_group(Cf, Caug, Af, sf[r:r + rows], y[r:r + rows].float(), b[r:r + rows, j], beam)
                         for r in range(0, out, rows)])
        v_new = _vectors(C, new) * s[:, None]
        gain = (((v_new @ A) * v_new).sum(1) - 2 * (v_new * y).sum(1)) - (((v_cur @ A) * v_cur).sum(1)
                                                                            - 2 * (v_cur * y).sum(1))
        take = gain < 0
        if bool(take.any()):
            b[take, j] = new[take]
            delta = torch.where(take[:, None], v_new - v_cur, torch.zeros_like(v_cur))
            G -= delta @ H[J, :]
            changed += int(take.sum())
    return b, changed


# ---------------------------------------------------------------------------------------------
# the solver
# ---------------------------------------------------------------------------------------------

def damped(H: Tensor, damp: float) -> Tensor:
    """H + λI (float64), λ = damp · mean(diag H) (1 when H is zero)."""
    Hd = H.detach().double().clone()
    lam = damp * float(Hd.diagonal().mean())
    if damp > 0:
        Hd.diagonal().add_(lam if lam > 0 else 1.0)
    return Hd


@torch.no_grad()
def aqlm_quantize(W: Tensor, H: Tensor, cfg: AQLMConfig, seed: int = 0) -> tuple[AQLMWeight, dict]:
    """Pure solver (module docstring). W [out, in], H [in, in] = 2/n Σ x xᵀ; ``seed`` draws the
    k-means start. Returns the weight and ``info``:

    * ``steps``: [(round, "init" | "codebooks" | "scales" | "codes", objective)], the damped
      objective tr((W - W^)(H + λI)(W - W^)ᵀ) after every step (codebooks, scales and codes never
      increase it; the float32 k-means start and the first rounding to the storage dtype may);
    * ``rounds``: the objective after each round; ``error``: tr((W - W^) H (W - W^)ᵀ) with the H
      given (as GPTQ reports it); ``lambda``, ``code_bits``, ``changed`` (groups recoded per round).
    """
    check_solver_inputs(W, H, "AQLM")
    out, n = W.shape
    g, M, K = cfg.in_group_size, cfg.num_codebooks, 2 ** cfg.nbits_per_codebook
    if n % g:
        raise LowbitError(f"AQLM needs an input width that is a multiple of in_group_size {g}, got {n}")
    with _one_cpu_thread(W.device):  # thousands of mid-sized ops: on a busy CPU two threads were 8x slower
        return _solve(W, H, cfg, seed)


def _solve(W: Tensor, H: Tensor, cfg: AQLMConfig, seed: int) -> tuple[AQLMWeight, dict]:
    out, n = W.shape
    g, M, K = cfg.in_group_size, cfg.num_codebooks, 2 ** cfg.nbits_per_codebook
    dtype = DTYPES[cfg.dtype]

    def store(t: Tensor) -> Tensor:
        return t.to(dtype).double()

    W64 = W.detach().double()
    Hd = damped(H, cfg.damp)
    gen = torch.Generator().manual_seed(seed)
    C, b, s = initialise(W64, M, K, g, cfg, gen)
    f = objective(W64, reconstruct(C, b, s), Hd)
    steps = [(0, "init", f)]
    C, s = store(C), store(s)
    if dtype != torch.float64:
        f = objective(W64, reconstruct(C, b, s), Hd)
        steps.append((0, "store", f))
    rounds, changed = [], []
    for r in range(1, cfg.rounds + 1):
        if cfg.codebook_steps:
            C_new = store(update_codebooks(W64, Hd, C, b, s, cfg.codebook_steps))
            f_new = objective(W64, reconstruct(C_new, b, s), Hd)
            if f_new < f:  # kept only when it helps after rounding to the stored dtype
                C, f = C_new, f_new
            steps.append((r, "codebooks", f))
        s = update_scales(W64, Hd, C, b, s, store)
        f = objective(W64, reconstruct(C, b, s), Hd)
        steps.append((r, "scales", f))
        b, k = update_codes(W64, Hd, C, b, s, cfg.beam_size)
        f = objective(W64, reconstruct(C, b, s), Hd)
        steps.append((r, "codes", f))
        rounds.append(f)
        changed.append(k)
    fmt = AQLMWeight.from_codes(b, C, s, (out, n), dtype=dtype)
    error = objective(W64, fmt.dequantize(torch.float64), H.detach().double())
    info = {"steps": steps, "rounds": rounds, "error": error, "lambda": float(Hd.diagonal().mean()
                                                                              - H.diagonal().double().mean()),
            "code_bits": cfg.code_bits, "changed": changed}
    return fmt, info


# ---------------------------------------------------------------------------------------------
# block fine-tuning (paper §3.3; the discrete step of PV-tuning)
# ---------------------------------------------------------------------------------------------

def tune_aqlm_block(block: nn.Module, inputs, targets, block_kwargs: dict, *, steps: int, lr: float, beam: int = 4,
                    references: dict[str, tuple[Tensor, Tensor]] | None = None) -> tuple[dict, dict[str, AQLMWeight]]:
    """Fine-tune the AQLM layers of ``block`` (modules holding `AQLMWeight`s) towards the float
    block's outputs ``targets`` on the batches ``inputs`` (same order):

    1. continuous: every layer's codebooks and scales and the block's norm gains by the shared
       block trainer (`lowbit.algorithms.block_tune.tune`: Adam on the relative squared error,
       the last batch held out), then rounded to the stored dtype;
    2. discrete (PV-tuning): each layer named in ``references`` ({name in the block: (W, H + λI)},
       its original weight and damped Hessian) has its codes searched again against the tuned
       codebooks, a group's codes changing only where that lowers tr((W - W^) H (W - W^)ᵀ)
       (`update_codes`).

    Each step is kept only if it lowers the held-out error (else its values are put back).
    Returns (report, weights): ``report`` the held-out error at the start and after each step,
    ``weights`` {name: AQLMWeight} of the tuned layers, for the caller to install (empty when
    nothing helped). The norm gains are changed in place."""
    from lowbit.algorithms.block_tune import block_parameters, relative_error, tune

    X, T = list(inputs), list(targets)
    if len(X) != len(T) or not X:
        raise LowbitError(f"AQLM block tuning needs one target per input batch, got {len(X)} inputs, {len(T)} targets")
    layers = {n: m for n, m in block.named_modules() if isinstance(getattr(m, "weight_format", None), AQLMWeight)}
    if not layers:
        return {"held_out": [], "kept": False}, {}
    stand_ins = {n: TunableAQLM(m) for n, m in layers.items()}

    def held_out() -> float:
        with torch.no_grad():
            return float(relative_error(block, X[-1], T[-1], block_kwargs))

    try:
        for n, t in stand_ins.items():
            block.set_submodule(n, t)
        params = [p for t in stand_ins.values() for p in (t.codebooks, t.factors)] + \
            block_parameters(block, (TunableAQLM,))
        start = [p.detach().clone() for p in params] + [t.scales.clone() for t in stand_ins.values()]
        res = tune(block, params, X, T, block_kwargs, steps, lr)
        for t in stand_ins.values():
            t.round_to_storage()
        err = [res.held_out_before, held_out()]
        if not err[1] < err[0]:
            with torch.no_grad():
                for p, v in zip(params + [t.scales for t in stand_ins.values()], start):
                    p.copy_(v)
            err[1] = err[0]
        if references:
            codes = {n: t.codes.clone() for n, t in stand_ins.items()}
            with torch.no_grad(), _one_cpu_thread(X[-1].device):
                for n, t in stand_ins.items():
                    if n in references:
                        W, H = (r.double() for r in references[n])
                        t.codes.copy_(update_codes(W, H, t.codebooks.double(), t.codes, t.scales.double(), beam)[0])
            err.append(held_out())
            if not err[2] < err[1]:
                for n, t in stand_ins.items():
                    t.codes.copy_(codes[n])
                err[2] = err[1]
        kept = err[-1] < err[0]
        weights = {n: t.weight_format() for n, t in stand_ins.items()} if kept else {}
    finally:
        for n, m in layers.items():
            block.set_submodule(n, m)
    return {"held_out": err, "kept": kept}, weights


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------

def _block_of(layer_name: str) -> str:
    """The decoder block a layer belongs to: its name up to the last numbered component
    (``model.layers.3.mlp.up_proj`` -> ``model.layers.3``)."""
    parts = layer_name.split(".")
    last = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[:last + 1])


@register_method("aqlm")
class AQLM(GPTQ):
    """Accumulates Σ x xᵀ per layer exactly as GPTQ does (inherited `observe`); solves with
    `aqlm_quantize`; with ``finetune_steps > 0`` tunes every finished block (`tune_block`)."""

    config_cls = AQLMConfig
    needs_calibration = True
    layer_records = ("errors", "tuned")

    def __init__(self, config: AQLMConfig):
        super().__init__(config)
        self.tuned: dict[str, dict] = {}                             # block -> held-out error through its tuning
        self._references: dict[str, tuple[Tensor, Tensor]] = {}      # this block's layers: (W, H + λI)

    @property
    def tunes_blocks(self) -> bool:
        return self.config.finetune_steps > 0

    def apply(self, layer_name: str, module: nn.Linear) -> AQLMWeight:
        check_finite(module.weight, layer_name)
        H = self.take_hessian(layer_name, "AQLM")
        fmt, info = aqlm_quantize(module.weight, H, self.config, layer_seed(self.config.seed, layer_name))
        self.errors[layer_name] = info["error"]
        if self.tunes_blocks:  # the discrete step of tune_block needs the layer's own objective
            block = _block_of(layer_name)
            self._references = {k: v for k, v in self._references.items() if _block_of(k) == block}
            self._references[layer_name] = (module.weight.detach().float().clone(),
                                            damped(H, self.config.damp).float())
        return fmt

    def tune_block(self, block: nn.Module, prefix: str, inputs, targets, block_kwargs: dict) -> dict:
        """Called by the calibration runner once every layer of ``block`` is quantized: `tune_aqlm_block`
        with the block's layer references; returns the tuned layers' weights (the runner installs
        them). Nothing unless ``finetune_steps > 0``."""
        if not self.tunes_blocks:
            return {}
        refs = {k[len(prefix) + 1:]: v for k, v in self._references.items() if k.startswith(prefix + ".")}
        self._references = {}
        cfg = self.config
        self.tuned[prefix], weights = tune_aqlm_block(block, inputs, targets, block_kwargs, steps=cfg.finetune_steps,
                                                      lr=cfg.finetune_lr, beam=cfg.beam_size, references=refs)
        return weights

    def describe(self) -> dict:
        d = super().describe()
        if self.tuned:
            d["tuning"] = dict(sorted(self.tuned.items()))
        return d
