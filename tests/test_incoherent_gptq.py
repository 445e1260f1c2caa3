"""GPTQ with incoherence processing (``incoherent=true``): on a weight with outlier channels the
Hessian-weighted error drops far below plain GPTQ's at the same bits, the stored weight is the
affine weight of ``U W V^T``, and the kernel, the reference and a save/load agree."""

import pytest
import torch
from torch import nn

from lowbit import api, checkpoint, kernels
from lowbit.algorithms.base import make_method
from lowbit.core.hadamard import Incoherence, layer_seed
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.base import WeightFormat
from lowbit.formats.incoherent import IncoherentAffineWeight
from lowbit.kernels import reference
from lowbit.models.tiny import tiny_model


def _layer():
    g = torch.Generator().manual_seed(0)
    n, out = 128, 64
    X = torch.randn(2048, n, generator=g) @ torch.randn(n, n, generator=g) * 0.1
    X[:, 3] *= 20
    W = torch.randn(out, n, generator=g) * 0.05
    W[:, 7] *= 30  # an outlier input channel
    W[5] *= 10     # and an outlier row
    lin = nn.Linear(n, out, bias=False)
    lin.weight.data = W
    return lin, X


def _solve(lin, X, bits, group, incoherent):
    m = make_method("gptq", QuantScheme(bits=bits, group_size=group), incoherent=incoherent, seed=2)
    m.observe("model.layers.0.mlp.up_proj", lin, X)
    return m.apply("model.layers.0.mlp.up_proj", lin), m.errors["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("bits,group", [(2, 64), (3, 64), (4, 128)])
def test_outliers_cost_far_less_after_incoherence(bits, group):
    lin, X = _layer()
    plain, e_plain = _solve(lin, X, bits, group, False)
    inc, e_inc = _solve(lin, X, bits, group, True)
    assert isinstance(inc, IncoherentAffineWeight) and inc.bits_per_weight == plain.bits_per_weight
    assert e_inc < 0.5 * e_plain
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    D = lin.weight.double() - inc.dequantize().double()
    assert e_inc == pytest.approx(float(((D.detach() @ H) * D.detach()).sum()), rel=1e-3)  # the error in the original basis


def test_the_stored_weight_is_the_transformed_one_and_the_kernel_agrees():
    lin, X = _layer()
    w, _ = _solve(lin, X, 4, 128, True)
    assert w.seed == layer_seed(2, "model.layers.0.mlp.up_proj")
    inc = Incoherence.for_shape(64, 128, w.seed)
    torch.testing.assert_close(w.dequantize(), inc.unweight(w.affine().dequantize()), rtol=0, atol=1e-5)
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1))
    b = torch.randn(64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(kernels.linear(x, w, b), reference.linear(x, w, b), rtol=1e-4, atol=1e-4)
    again = WeightFormat.from_state_dict(w.tensors(), w.meta())
    assert isinstance(again, IncoherentAffineWeight) and torch.equal(again.dequantize(), w.dequantize())
    from lowbit.formats.affine import AffineWeight

    odd = AffineWeight.quantize_rtn(torch.randn(21, 128), QuantScheme(bits=4, group_size=32))
    with pytest.raises(LowbitError, match="Hadamard-factorisable widths; its output width 21"):
        IncoherentAffineWeight.wrap(odd, 0)
    lin2 = nn.Linear(128, 21, bias=False)
    with pytest.raises(LowbitError, match="this layer is 21 x 128"):
        _solve(lin2, X, 4, 32, True)

def test_a_model_quantized_with_incoherence_saves_and_reloads_exactly(tmp_path):
    t = tiny_model("llama", seed=3)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    rec = api.quantize(m, "gptq", QuantScheme(bits=4, group_size=32), progress=False, n_samples=4, seq_len=32,
                       incoherent=True)
    assert rec["method"]["config"]["incoherent"] is True
    x = torch.arange(20)[None] % 250
    with torch.no_grad():
        got = m.model(x).logits
    loaded, _, rec2 = checkpoint.load(api.save(m, str(tmp_path / "q")))
    assert {mm["format"] for mm in rec2["modules"].values()} == {"affine-incoherent"}
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, got)
