"""Quantizing the output layer (``api.quantize(..., head=...)`` / ``lowbit quantize --head``)."""

import json

import pytest
import torch
from torch import nn

from lowbit import api, checkpoint
from lowbit.cli import main
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.formats.affine import AffineWeight
from lowbit.models.tiny import save_tiny, tiny_model
from lowbit.nn.linear import QuantizedLinear
from lowbit.runtime import LeanDecoder
from lowbit.algorithms import head_embed


def _model(model_type="llama", **overrides):
    overrides.setdefault("tie_word_embeddings", True)
    t = tiny_model(model_type, **overrides)
    return api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)


def _ids(m, n=24, seed=3):
    return torch.randint(0, m.model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_head_is_the_rtn_quantized_embedding_and_the_embedding_stays_float(head):
    m = _model()
    assert m.model.config.tie_word_embeddings
    E = m.model.get_input_embeddings().weight.detach().clone()
    rec = api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32), head=head, progress=False)
    out = m.model.get_output_embeddings()
    assert isinstance(out, QuantizedLinear) and rec["head"]["name"] == head
    # the head holds exactly RTN of the (tied) embedding matrix on the head's grid
    ref = AffineWeight.quantize_rtn(E, head_embed.HEAD_SCHEMES[head])
    assert torch.equal(out.weight_format.dequantize(), ref.dequantize())
    assert torch.equal(m.model.get_input_embeddings().weight, E)  # lookup table untouched
    x = _ids(m)
    h = torch.randn(2, 5, E.shape[1])
    assert torch.allclose(out(h), h @ ref.dequantize().T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(m.model(x).logits).all()


def test_head_checkpoint_round_trip_is_bit_identical_and_untied(tmp_path):
    m = _model()
    api.quantize(m, "rtn", QuantScheme(bits=4, group_size=32), head="int8", progress=False)
    x = _ids(m)
    with torch.no_grad():
        y = m.model(x).logits
    out = api.save(m, tmp_path / "q")
    rec = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert "lm_head" in rec["modules"] and rec["tied_word_embeddings"] is False
    loaded, _, _ = checkpoint.load(out)
    assert isinstance(loaded.lm_head, QuantizedLinear)
    assert isinstance(loaded.get_input_embeddings(), nn.Embedding)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, y)


def test_lean_decoder_runs_a_quantized_head_like_transformers():
    m = _model()
    api.quantize(m, "rtn", QuantScheme(bits=8, granularity="channel", group_size=None), head="int4", progress=False)
    ids = _ids(m, n=20)[0]
    with torch.inference_mode():
        ref = m.model(ids[None]).logits[0]
    dec = LeanDecoder(m.model, max_len=len(ids))
    got = torch.cat([dec.forward(ids[:12], all_logits=True)] + [dec.forward(ids[t:t + 1])[None] for t in range(12, 20)])
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_head_bad_input():
    m = _model()
    with pytest.raises(LowbitError, match="int8, int6, int4"):
        api.quantize(m, "rtn", head="int3", progress=False)
    assert m.record is None  # refused before anything changed
    m.model.get_output_embeddings().weight.data[0, 0] = float("nan")
    with pytest.raises(LowbitError, match="NaN"):
        api.quantize(m, "rtn", head="int8", progress=False)


def test_cli_quantize_head(tmp_path, capsys):
    tiny = save_tiny(tmp_path / "tiny", "llama")
    code = main(["quantize", str(tiny), "--head", "int8", "-o", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert rec["modules"]["lm_head"]["format"] == "affine" and rec["head"]["name"] == "int8"
    with pytest.raises(SystemExit):
        main(["quantize", str(tiny), "--head", "int2", "-o", str(tmp_path / "bad")])
