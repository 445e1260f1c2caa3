"""An AWQ checkpoint in GGUF: its per-channel scales are already folded into the norms (and into
v → o, up → down) when the checkpoint is made, so a GGUF type that holds AWQ's codes carries the
whole method: the file read back as a float model computes what the checkpoint computes.

* every block linear of a symmetric 4-bit g32 AWQ checkpoint is written to Q4_0 with its own
  codes (listed as carried, none re-quantized);
* the GGUF's norm weights are the checkpoint's folded norms, not the original's;
* the GGUF loaded back by lowbit (dequantized to float; the embedding written as F32, as the
  checkpoint keeps it) gives the checkpoint's logits.
"""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowbit import api  # noqa: E402
from lowbit.core.scheme import QuantScheme  # noqa: E402
from lowbit.export import gguf as GW  # noqa: E402
from lowbit.models.tiny import save_tiny  # noqa: E402

SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             num_hidden_layers=2, tie_word_embeddings=True, initializer_range=0.1)


@pytest.fixture(scope="module")
def awq(tmp_path_factory):
    hf = save_tiny(tmp_path_factory.mktemp("hf") / "tiny", "llama", seed=4, **SHAPE)
    m = api.load(str(hf))
    scheme = QuantScheme(bits=4, group_size=32, scale_dtype="float16")
    api.quantize(m, "awq", scheme, n_samples=4, seq_len=32, progress=False)
    return hf, m


def test_awq_codes_and_folded_norms_are_written(awq, tmp_path):
    hf, m = awq
    rep = GW.export_gguf(m, tmp_path / "a.gguf", "Q4_0")
    layers = GW.affine_layers(m.model)
    assert len(layers) == 14 and rep.carried == {k: "Q4_0" for k in layers} and rep.requantized == {}
    theirs = {t.name: t for t in gguf.GGUFReader(rep.path).tensors}
    orig = api.load(str(hf)).model
    changed = 0
    for i, (blk, blk0) in enumerate(zip(m.model.model.layers, orig.model.layers)):
        for hf_name, gname in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            got = np.asarray(theirs[f"blk.{i}.{gname}.weight"].data)
            want = getattr(blk, hf_name).weight.detach().numpy()
            assert np.array_equal(got, want), f"blk.{i}.{gname}"
            changed += not np.array_equal(got, getattr(blk0, hf_name).weight.detach().numpy())
    assert changed > 0  # AWQ did fold scales into the norms


def test_gguf_of_awq_computes_the_checkpoint(awq, tmp_path):
    _, m = awq
    # the embedding in F32 as the checkpoint keeps it (a Q4_0 file would quantize it too)
    rep = GW.export_gguf(m, tmp_path / "b.gguf", "Q4_0", tensor_types={"token_embd.weight": "F32"})
    back = api.load(rep.path)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m.model(input_ids=ids).logits
        got = back.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
