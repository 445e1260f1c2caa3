"""GPU kernels (lowbit.kernels.triton_gpu) against the reference path, run by Triton's interpreter
on CPU tensors (TRITON_INTERPRET=1), so they are checked on machines without a GPU.

* y = x Wᵀ + b against `lowbit.kernels.reference` (dequantize, then the matmul) for affine weights
  (2, 3, 4, 8 bits; symmetric, integer and float zero-points; per tensor, per channel and groups
  of 32 / 48 / 64 / 128 with ragged last groups) and NF4 (with and without double quantization,
  blocks straddling rows), batch 1 / 3 / 17 (GEMV-style and tl.dot kernels), split-K, bias;
* the dequantized weight inside the kernels equals ``w.dequantize()`` bit for bit (x = rows of
  the identity: y is then W's columns exactly), for float32, float16 and bfloat16 activations;
* the kernel table: the "cuda" rows are what lookups for CUDA tensors find, and the entries
  return NotImplemented for what they do not take;
* the kernels compile for an sm_90 GPU (no GPU needed; a subprocess without the interpreter).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported or any kernel is compiled

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.triton_util import run_python as _python  # noqa: E402

triton = pytest.importorskip("triton")

from lowbit import kernels  # noqa: E402
from lowbit.algorithms.nf4 import NF4Config, nf4_quantize  # noqa: E402
from lowbit.core.scheme import QuantScheme  # noqa: E402
from lowbit.formats.affine import AffineWeight  # noqa: E402
from lowbit.formats.nf4 import NF4Weight  # noqa: E402
from lowbit.kernels import reference, triton_gpu  # noqa: E402

TOL = 1e-5  # relative error (max |y - y_ref| / max |y_ref|) for float32 activations


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# (bits, symmetric, zero_point, granularity, group, out, in)
AFFINE = [
    (4, True, "int", "group", 128, 48, 576),  # W4A16 g128, ragged: 4 groups of 128 and one of 64
    (4, False, "int", "group", 32, 40, 256),  # packed integer zero-points, several groups per tile
    (8, True, "int", "channel", None, 33, 200),  # W8A16 per channel, odd out
    (8, False, "int", "group", 64, 32, 192),
    (4, False, "float", "group", 64, 32, 160),  # float zero-points, ragged (2 x 64 + 32)
    (2, False, "int", "group", 32, 32, 96),
    (3, False, "int", "group", 48, 40, 200),  # odd width (codes straddle bytes), group not a power of two
    (4, True, "int", "tensor", None, 24, 64),
    (8, True, "int", "group", 128, 24, 64),  # one short group per row
]


def _affine(case, seed=0):
    bits, sym, zp, gran, group, out_f, in_f = case
    scheme = QuantScheme(bits=bits, symmetric=sym, granularity=gran, group_size=group, zero_point=zp)
    W = torch.randn(out_f, in_f, generator=_gen(seed)) * torch.linspace(0.2, 2, in_f)
    return AffineWeight.quantize_rtn(W, scheme)


def _rel(y, y_ref):
    return float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())


def _check_float32(w, M, bias, seed=1, config=None):
    g = _gen(seed)
    x = torch.randn(M, w.shape[1], generator=g)
    b = torch.randn(w.shape[0], generator=g) if bias else None
    run = triton_gpu.nf4_run if isinstance(w, NF4Weight) else triton_gpu.affine_run
    y = run(x, w, b, config=config)
    y_ref = reference.linear(x, w, b)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert _rel(y, y_ref) < TOL


def _check_exact(w, M, dtype, run):
    """x = the first M rows of the identity: y[m, n] = W[n, m] with no rounding but the cast of the
    dequantized weight to the activations' dtype, so y must equal dequantize()'s columns."""
    x = torch.eye(w.shape[1])[:M].to(dtype)
    y = run(x, w)
    assert y.dtype == dtype and torch.equal(y, w.dequantize(dtype)[:, :M].T)


def _case_id(c):
    return f"int{c[0]}-{c[3]}{c[4] or ''}-{'sym' if c[1] else c[2]}-{c[5]}x{c[6]}"


@pytest.mark.parametrize("case", AFFINE, ids=_case_id)
def test_affine_matches_reference(case):
    w = _affine(case)
    for M, bias in ((1, True), (3, False), (17, True)):
        _check_float32(w, M, bias)
    for M in (1, 17):
        _check_exact(w, M, torch.float32, triton_gpu.affine_run)


def _nf4(shape, double_quant=True, seed=2):
    W = torch.randn(*shape, generator=_gen(seed))
    return nf4_quantize(W, NF4Config(double_quant=double_quant))


NF4_CASES = [((40, 200), True),  # 125 blocks of 64 straddling rows
             ((64, 576), True),  # 576 blocks: 3 blocks of nested absmax, one absmax per block in a tile
             ((33, 128), False),
             ((24, 75), True)]  # odd rows: rows start in the middle of a byte


@pytest.mark.parametrize("shape,dq", NF4_CASES, ids=lambda c: str(c))
def test_nf4_matches_reference(shape, dq):
    w = _nf4(shape, dq)
    for M, bias in ((1, False), (3, True), (17, True)):
        _check_float32(w, M, bias)
    for M in (1, 17):
        _check_exact(w, M, torch.float32, triton_gpu.nf4_run)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_activations(dtype):
    """16-bit activations: the weight is cast to x's dtype (as the reference casts it), products
    accumulate in float32, the output is x's dtype."""
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    for w, run in ((_affine(AFFINE[0]), triton_gpu.affine_run), (_affine(AFFINE[1]), triton_gpu.affine_run),
                   (_nf4((40, 200)), triton_gpu.nf4_run)):
        for M in (1, 17):
            g = _gen(M)
            x = torch.randn(M, w.shape[1], generator=g).to(dtype)
            b = torch.randn(w.shape[0], generator=g)
            y = run(x, w, b)
            y_ref = (x.float() @ w.dequantize(dtype).float().T + b.to(dtype).float()).to(dtype)
            assert y.dtype == dtype and _rel(y, y_ref) < tol
            _check_exact(w, M, dtype, run)


def test_split_k_and_shapes():
    """Forced input splits (partial sums added, the bias once), 3-D activations, a non-contiguous x."""
    w = _affine(AFFINE[0])
    for M in (1, 3, 17):
        _check_float32(w, M, True, config={"split_k": 3})
    _check_float32(_nf4((40, 200)), 17, True, config={"split_k": 2})
    x = torch.randn(2, 3, 2 * w.shape[1], generator=_gen(5))[..., ::2]
    b = torch.randn(w.shape[0], generator=_gen(6))
    y = triton_gpu.affine_linear(x, w, b)
    assert y.shape == (2, 3, w.shape[0]) and _rel(y, reference.linear(x, w, b)) < TOL


def test_plan():
    dev = torch.device("cpu")
    assert triton_gpu.plan(1, 4096, 4096, dev)["DOT"] is False
    assert triton_gpu.plan(17, 4096, 4096, dev)["DOT"] is True
    for M, N, K in ((1, 64, 4096), (16, 64, 576), (200, 4096, 4096)):
        p = triton_gpu.plan(M, N, K, dev, {"split_k": 5})
        assert p["k_split"] % p["BLOCK_K"] == 0 and (p["split_k"] - 1) * p["k_split"] < K <= p["split_k"] * p["k_split"]


def test_cuda_rows_in_the_table(monkeypatch):
    w = _affine(AFFINE[0])
    assert kernels.find("affine", None, "cuda").linear is triton_gpu.affine_linear
    assert kernels.find("nf4", None, "cuda").linear is triton_gpu.nf4_linear
    assert kernels.select(w, device="cuda").device == "cuda"
    assert kernels.find("affine", None, "cpu").device == "cpu"  # the CPU rows are untouched
    assert kernels.find("nf4", None, "cpu").device == "cpu"
    # kernels.linear on a CUDA tensor runs the cuda row (a stand-in x: no GPU here)
    calls = []
    spy = dataclasses.replace(kernels.find("affine", None, "cuda"), linear=lambda x, w, b: calls.append(x) or "ran")
    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "cuda"), spy)
    monkeypatch.setitem(kernels.KERNELS, ("affine", "float", "any"), dataclasses.replace(spy, device="any",
                                                                                     linear=lambda x, w, b: "any"))
    monkeypatch.setattr(kernels, "_ROUTES", {})

    class CudaX:
        device = torch.device("cuda")

    assert kernels.linear(CudaX(), w) == "ran" and len(calls) == 1  # the cuda row before "any"


def test_not_implemented_for_what_the_kernels_do_not_take():
    w, wn = _affine(AFFINE[0]), _nf4((40, 200))
    x = torch.randn(2, w.shape[1])
    assert triton_gpu.affine_linear(x, w, interpret=False) is NotImplemented  # a CPU tensor, no interpreter
    assert triton_gpu.nf4_linear(torch.randn(2, 200), wn, interpret=False) is NotImplemented
    assert triton_gpu.affine_linear(x.double(), w) is NotImplemented
    assert triton_gpu.affine_linear(torch.randn(2, 100), w) is NotImplemented  # wrong in_features
    assert triton_gpu.affine_linear(x.requires_grad_(), w) is NotImplemented  # autograd: the reference
    with torch.no_grad():
        assert triton_gpu.affine_linear(x, w) is not NotImplemented
    assert triton_gpu.affine_linear(x.detach(), w) is not NotImplemented  # interpret=None: TRITON_INTERPRET decides


def test_import_is_cheap_and_works_without_triton():
    r = _python("import sys, lowbit.kernels\n"
                "assert 'triton' not in sys.modules, 'importing lowbit.kernels imported triton'\n", False)
    assert r.returncode == 0, r.stderr
    r = _python("import sys\n"
                "sys.modules['triton'] = None  # triton not installed\n"
                "import torch\n"
                "from lowbit import kernels\n"
                "from lowbit.kernels import triton_gpu, reference\n"
                "from lowbit.core.scheme import QuantScheme\n"
                "from lowbit.formats.affine import AffineWeight\n"
                "w = AffineWeight.quantize_rtn(torch.randn(8, 64), QuantScheme(4, True, 'group', 32))\n"
                "x = torch.randn(2, 64)\n"
                "assert triton_gpu.affine_linear(x, w) is NotImplemented\n"
                "assert torch.equal(kernels.linear(x, w), kernels.linear(x, w))\n", True)
    assert r.returncode == 0, r.stderr


def test_kernels_compile_for_sm90():
    """The real (not interpreted) kernels build for an H100 with triton's own ptxas: a GEMV-style
    and a tl.dot variant of each kernel."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    r = _python("import torch\n"
                "from lowbit.algorithms.nf4 import NF4Config, nf4_quantize\n"
                "from lowbit.core.scheme import QuantScheme\n"
                "from lowbit.formats.affine import AffineWeight\n"
                "from lowbit.kernels import triton_gpu\n"
                "w4 = AffineWeight.quantize_rtn(torch.randn(64, 576), QuantScheme(4, False, 'group', 128))\n"
                "w8 = AffineWeight.quantize_rtn(torch.randn(64, 256), QuantScheme(8, True, 'channel', None))\n"
                "wn = nf4_quantize(torch.randn(64, 256), NF4Config())\n"
                "for w, x in ((w4, torch.randn(1, 576).half()), (w4, torch.randn(32, 576).bfloat16()),\n"
                "             (w8, torch.randn(2, 256)), (wn, torch.randn(1, 256).bfloat16()),\n"
                "             (wn, torch.randn(17, 256).half())):\n"
                "    k = triton_gpu.compile_for(x, w, torch.randn(64), arch=90)\n"
                "    assert k.asm['cubin'], 'no binary'\n", False)
    assert r.returncode == 0, r.stderr[-3000:]
