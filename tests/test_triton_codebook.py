"""GPU kernels of the codebook formats (lowbit.kernels.triton_codebook) against the reference path,
run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1), so they are checked on machines
without a GPU.

* E8P (2, 3 and 4 bits; plain and tuned sign vectors; Sylvester, Paley and dense orthogonal
  transforms) and AQLM (1 and 2 codebooks of 8 bits, 1 of 16 bits, 2 of 4 bits; groups of 8, 4
  and 12; float16, bfloat16 and float32 codebooks), batch 1 / 3 / 16 (GEMV-style and tl.dot
  kernels; 40 rows once), bias and no bias, against `lowbit.kernels.reference` (dequantize, then
  the matmul); split-K, 3-D and non-contiguous activations; weights from the quantizers (QuIP#,
  AQLM);
* the decoded weight inside the kernels equals the format's own decoding bit for bit (x = rows of
  the identity): ``w.transformed()`` for E8P (every one of the 65,536 codes), ``w.dequantize()``
  for AQLM, in float32, float16 and bfloat16;
* float16 / bfloat16 activations against the reference within their precision;
* the transforms on the device against `lowbit.core.hadamard`'s;
* the kernel table: the "cuda" rows are what lookups for CUDA tensors find, and the entries return
  NotImplemented for what they do not take (CPU tensors with interpret=False, triton missing);
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
from lowbit.core.hadamard import Incoherence, hadamard_factors  # noqa: E402
from lowbit.formats.aqlm import AQLMWeight  # noqa: E402
from lowbit.formats.e8p import E8PWeight  # noqa: E402
from lowbit.kernels import reference  # noqa: E402
from lowbit.kernels import triton_codebook as tc  # noqa: E402

TOL = 1e-5  # relative error (max |y - y_ref| / max |y_ref|) for float32 activations


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rel(y, y_ref):
    return float((y.float() - y_ref.float()).abs().max() / y_ref.float().abs().max())


def _orthogonal(n, g):
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(torch.float32)


def _e8p(out, n, bits=2, tuned=False, seed=0, codes=None):
    """An E8PWeight of random codes (and residual); ``tuned``: continuous sign vectors; a width with
    no Hadamard factorisation gets a stored random orthogonal matrix."""
    g = _gen(seed)
    if codes is None:
        codes = torch.randint(0, 65536, (out, n // 8), generator=g)
    residual = None
    if bits > 2:
        residual = torch.randint(0, 65536 if bits == 4 else 256, (out, n // 8), generator=g)
    su = torch.rand(out, generator=g) + 0.5 if tuned else None
    sv = torch.randn(n, generator=g) * 1.3 if tuned else None
    ud = _orthogonal(out, g) if hadamard_factors(out) is None else None
    vd = _orthogonal(n, g) if hadamard_factors(n) is None else None
    return E8PWeight.from_codes(codes, 0.7 if bits == 2 else [0.7, 0.11], (out, n), seed=seed + 5, bits=bits,
                                residual=residual, su=su, sv=sv, u_dense=ud, v_dense=vd)


def _aqlm(out, n, M=2, B=8, g=8, dtype=torch.float16, seed=0):
    gen = _gen(seed)
    codes = torch.randint(0, 2**B, (out, n // g, M), generator=gen)
    codebooks = torch.randn(M, 2**B, g, generator=gen) * 0.3
    scales = torch.rand(out, generator=gen) + 0.5
    return AQLMWeight.from_codes(codes, codebooks, scales, (out, n), dtype=dtype)


def _check_float32(w, run, M, bias, seed=1, config=None):
    g = _gen(seed)
    x = torch.randn(M, w.shape[1], generator=g)
    b = torch.randn(w.shape[0], generator=g) if bias else None
    y = run(x, w, b, config=config)
    y_ref = reference.linear(x, w, b)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert _rel(y, y_ref) < TOL, (M, bias, _rel(y, y_ref))


def _identity(M, K, dtype):
    return torch.eye(K)[:M].to(dtype)


# (out, in, bits, tuned): Sylvester both sides; Paley I bases (40 = 20 x 2, 96 = 12 x 8) with tuned
# signs; no factorisation on either side (dense orthogonal), 23 vectors a row (ragged tiles)
E8P_CASES = [(64, 128, 2, False), (40, 96, 3, True), (22, 184, 4, False), (48, 576, 2, True)]


@pytest.mark.parametrize("case", E8P_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}bit{'-tuned' if c[3] else ''}")
def test_e8p_matches_reference(case):
    out, n, bits, tuned = case
    w = _e8p(out, n, bits, tuned, seed=bits)
    for M, bias in ((1, True), (3, False), (16, True)):
        _check_float32(w, tc.e8p_run, M, bias)
    for M in (1, 16):  # W~ decoded in the kernel = transformed(), GEMV-style and tl.dot
        z = tc.e8p_transformed_run(_identity(M, n, torch.float32), w)
        assert torch.equal(z, w.transformed()[:, :M].T)


def test_e8p_every_code():
    """All 65,536 codes (8192 rows of 8 codes) decode in the kernel to `lowbit.core.e8p.decode`."""
    w = _e8p(8192, 64, codes=torch.arange(65536).reshape(8192, 8))
    z = tc.e8p_transformed_run(_identity(64, 64, torch.float32), w)
    assert torch.equal(z, w.transformed().T)


# (codebooks, bits per code, group, codebook dtype): 2x8 and 1x8 (groups of 8), 1x16, 2x4 with groups
# of 4, 1x8 with groups of 12 (not a power of two: one code load per column), 2x8 with float32 and
# bfloat16 codebooks
AQLM_CASES = [(2, 8, 8, torch.float16), (1, 8, 8, torch.float16), (1, 16, 8, torch.float16), (2, 4, 4, torch.float16),
              (1, 8, 12, torch.float16), (2, 8, 8, torch.float32), (2, 8, 8, torch.bfloat16)]


@pytest.mark.parametrize("case", AQLM_CASES, ids=lambda c: f"{c[0]}x{c[1]}g{c[2]}-{str(c[3])[6:]}")
def test_aqlm_matches_reference(case):
    M_, B, g, dtype = case
    w = _aqlm(40, 24 * g, M=M_, B=B, g=g, dtype=dtype, seed=B)
    for M, bias in ((1, False), (3, True), (16, True)):
        _check_float32(w, tc.aqlm_run, M, bias)
    for M in (1, 16):
        y = tc.aqlm_run(_identity(M, w.shape[1], torch.float32), w)
        assert torch.equal(y, w.dequantize()[:, :M].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_activations(dtype):
    """16-bit activations: the output has x's dtype and is as close to the exact product (float64,
    the float32 weight) as the reference is; the decoded weight, cast to x's dtype, equals the
    format's own decoding cast the same way."""
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    cases = ((_e8p(64, 128, 2, True), tc.e8p_run), (_e8p(40, 96, 4), tc.e8p_run),
             (_aqlm(40, 192), tc.aqlm_run), (_aqlm(24, 128, 1, 16), tc.aqlm_run))
    for w, run in cases:
        for M in (1, 16):
            g = _gen(M)
            x = torch.randn(M, w.shape[1], generator=g).to(dtype)
            b = torch.randn(w.shape[0], generator=g)
            y = run(x, w, b)
            y_ref = (x.float() @ w.dequantize(dtype).float().T + b.to(dtype).float()).to(dtype)
            y_exact = x.double() @ w.dequantize().double().T + b.double()
            assert y.dtype == dtype and _rel(y, y_exact) < tol, (type(w).name, M, _rel(y, y_exact))
            assert _rel(y, y_ref) < 2 * tol, (type(w).name, M, _rel(y, y_ref))
            xi = _identity(M, w.shape[1], dtype)
            if run is tc.e8p_run:
                z = tc.e8p_transformed_run(xi, w, out_dtype=dtype)
                assert torch.equal(z, w.transformed().to(dtype)[:, :M].T)
            else:
                assert torch.equal(run(xi, w), w.dequantize(dtype)[:, :M].T)


def test_weights_from_the_quantizers():
    from lowbit.algorithms.aqlm import AQLMConfig, aqlm_quantize
    from lowbit.algorithms.quip import QuIPConfig, quip_quantize

    g = _gen(3)
    W = torch.randn(32, 64, generator=g)
    X = torch.randn(256, 64, generator=g)
    H = 2 * X.T @ X / 256
    we, _ = quip_quantize(W, H, QuIPConfig(bits=2, scale_vectors=64), seed=7)
    wa, _ = aqlm_quantize(W, H, AQLMConfig(bits=2, rounds=1, codebook_steps=2, kmeans_iters=2, kmeans_points=256,
                                           beam_size=1))
    for w in (we, wa):
        x = torch.randn(3, 64, generator=g)
        assert _rel(kernels.find(type(w).name, None, "cuda").linear(x, w), reference.linear(x, w)) < TOL


def test_split_k_and_shapes():
    """Forced input splits (float32 partial sums added, the bias once), a batch past 16 rows (no
    split, 64-row tiles), 3-D activations, a non-contiguous x."""
    we, wa = _e8p(48, 576, 2, True), _aqlm(40, 192)
    for M in (1, 16):
        _check_float32(we, tc.e8p_run, M, True, config={"split_k": 3})
        _check_float32(wa, tc.aqlm_run, M, True, config={"split_k": 2})
    _check_float32(we, tc.e8p_run, 40, False)
    _check_float32(wa, tc.aqlm_run, 40, True)
    for w, fn in ((we, tc.e8p_linear), (wa, tc.aqlm_linear)):
        x = torch.randn(2, 3, 2 * w.shape[1], generator=_gen(5))[..., ::2]
        b = torch.randn(w.shape[0], generator=_gen(6))
        y = fn(x, w, b)
        assert y.shape == (2, 3, w.shape[0]) and _rel(y, reference.linear(x, w, b)) < TOL


@pytest.mark.parametrize("n", [64, 96, 184, 576, 1 << 15])
def test_device_transforms(n):
    """`DeviceIncoherence` (factors kept on the device, the 1 / sqrt(n) folded in) against
    `Incoherence`: Sylvester (2^15: three factors), Paley, dense orthogonal; random and tuned signs."""
    g = _gen(n)
    out = 40
    vd = _orthogonal(n, g) if hadamard_factors(n) is None else None
    for sv in (None, torch.randn(n, generator=g)):
        inc = Incoherence.for_shape(out, n, 9, su=None if sv is None else torch.rand(out, generator=g), sv=sv,
                                    v_dense=vd)
        dev = tc.DeviceIncoherence(inc, torch.device("cpu"))
        x, z = torch.randn(3, n, generator=g), torch.randn(3, out, generator=g)
        assert _rel(dev.input(x), inc.input(x)) < 1e-5 and _rel(dev.output(z), inc.output(z)) < 1e-5
        assert _rel(dev.V.apply_t(dev.V.apply(x)), x if sv is None else x * sv * sv) < 1e-5


def test_device_incoherence_is_cached():
    w = _e8p(64, 128)
    assert tc.device_incoherence(w) is tc.device_incoherence(w)
    assert tc.device_incoherence(_e8p(64, 128)) is not tc.device_incoherence(w)


def test_cuda_rows_in_the_table(monkeypatch):
    we, wa = _e8p(64, 128), _aqlm(40, 192)
    assert kernels.find("e8p", None, "cuda").linear is tc.e8p_linear
    assert kernels.find("aqlm", None, "cuda").linear is tc.aqlm_linear
    assert kernels.select(we, device="cuda").device == "cuda" and kernels.select(wa, device="cuda").device == "cuda"
    assert kernels.find("e8p", None, "cpu").device == "cpu"  # the CPU rows are untouched
    assert kernels.find("aqlm", None, "cpu").device == "cpu"
    # kernels.linear on a CUDA tensor runs the cuda row (a stand-in x: no GPU here)
    calls = []
    for fmt in ("e8p", "aqlm"):
        spy = dataclasses.replace(kernels.find(fmt, None, "cuda"), linear=lambda x, w, b: calls.append(w) or "ran")
        monkeypatch.setitem(kernels.KERNELS, (fmt, "float", "cuda"), spy)
    monkeypatch.setattr(kernels, "_ROUTES", {})

    class CudaX:
        device = torch.device("cuda")

    assert kernels.linear(CudaX(), we) == "ran" and kernels.linear(CudaX(), wa) == "ran"
    assert calls == [we, wa]  # the cuda rows before the "any" rows


def test_not_implemented_for_what_the_kernels_do_not_take():
    we, wa = _e8p(64, 128), _aqlm(40, 192)
    for w, fn in ((we, tc.e8p_linear), (wa, tc.aqlm_linear)):
        x = torch.randn(2, w.shape[1])
        assert fn(x, w, interpret=False) is NotImplemented  # a CPU tensor, no interpreter
        assert fn(x.double(), w) is NotImplemented
        assert fn(torch.randn(2, 8), w) is NotImplemented  # wrong in_features
        assert fn(x.requires_grad_(), w) is NotImplemented  # autograd: the reference
        with torch.no_grad():
            assert fn(x, w) is not NotImplemented
        assert fn(x.detach(), w) is not NotImplemented  # interpret=None: TRITON_INTERPRET decides


def test_without_triton():
    r = _python("import sys\n"
                "sys.modules['triton'] = None  # triton not installed\n"
                "import torch\n"
                "from lowbit import kernels\n"
                "from lowbit.kernels import triton_codebook as tc\n"
                "from lowbit.formats.aqlm import AQLMWeight\n"
                "w = AQLMWeight.from_codes(torch.randint(0, 256, (8, 8, 2)), torch.randn(2, 256, 8),\n"
                "                          torch.rand(8) + 0.5, (8, 64))\n"
                "x = torch.randn(2, 64)\n"
                "assert tc.aqlm_linear(x, w) is NotImplemented\n"
                "assert torch.allclose(kernels.linear(x, w), kernels.reference.linear(x, w), atol=1e-5)\n", True)
    assert r.returncode == 0, r.stderr


def test_kernels_compile_for_sm90():
    """The real (not interpreted) kernels build for an H100 with triton's own ptxas: GEMV-style and
    tl.dot variants, E8P at 2 and 4 bits, AQLM 2x8, 1x16 and groups of 12."""
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend here")
    r = _python("import torch\n"
                "from lowbit.formats.aqlm import AQLMWeight\n"
                "from lowbit.formats.e8p import E8PWeight\n"
                "from lowbit.kernels import triton_codebook as tc\n"
                "def e8p(bits):\n"
                "    c = torch.randint(0, 65536, (64, 32))\n"
                "    return E8PWeight.from_codes(c, 0.5 if bits == 2 else [0.5, 0.1], (64, 256), 3, bits=bits,\n"
                "                                residual=None if bits == 2 else c)\n"
                "def aqlm(M, B, g):\n"
                "    return AQLMWeight.from_codes(torch.randint(0, 2**B, (64, 384 // g, M)), torch.randn(M, 2**B, g),\n"
                "                                 torch.rand(64) + 0.5, (64, 384))\n"
                "for w, x in ((e8p(2), torch.randn(1, 256).bfloat16()), (e8p(2), torch.randn(16, 256).half()),\n"
                "             (e8p(4), torch.randn(2, 256)), (aqlm(2, 8, 8), torch.randn(1, 384).bfloat16()),\n"
                "             (aqlm(1, 16, 8), torch.randn(16, 384).bfloat16()),\n"
                "             (aqlm(1, 8, 12), torch.randn(3, 384).half())):\n"
                "    k = tc.compile_for(x, w, torch.randn(64), arch=90)\n"
                "    assert k.asm['cubin'], 'no binary'\n", False)
    assert r.returncode == 0, r.stderr[-3000:]
