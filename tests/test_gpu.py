"""The same code on a CUDA GPU (skipped where there is none): block runner, evaluation, memory."""

import pytest
import torch

from lowbit.algorithms.base import make_method
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.core.scheme import QuantScheme
from lowbit.eval.quality import PplProtocol, evaluate_quality
from lowbit.nn.linear import QuantizedLinear
from tests.tiny import tiny_gemma3, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SCHEME = QuantScheme(4, False, "group", 48)


def _samples(n=6, L=32, vocab=96):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_runner_on_cuda_matches_cpu(make):
    cpu, gpu = make(), make()
    apply_data_free(cpu, make_method("rtn", SCHEME), progress=False)
    stats = run_sequential(gpu, make_method("rtn", SCHEME), _samples(), device="cuda", batch_size=3, progress=False)
    assert stats.cuda_peak_bytes > 0
    assert next(gpu.parameters()).device.type == "cpu"  # blocks went back home
    agree = total = 0
    for (n1, m1), (n2, m2) in zip(cpu.named_modules(), gpu.named_modules()):
        if isinstance(m1, QuantizedLinear):
            q1, q2 = m1.weight_format.integers(), m2.weight_format.integers()
            agree += int((q1 == q2).sum())
            total += q1.numel()
            torch.testing.assert_close(m1.scales, m2.scales, rtol=0, atol=0)
    assert agree / total > 0.999  # only exact .5 ties may round differently on the GPU
    x = _samples(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x).logits, cpu(x).logits, rtol=1e-3, atol=1e-3)


def test_quality_on_cuda_matches_cpu():
    base, q = tiny_llama(), tiny_llama()
    apply_data_free(q, make_method("rtn", QuantScheme(3, True, "group", 24)), progress=False)
    tokens = torch.randint(0, 96, (600,), generator=torch.Generator().manual_seed(5))
    prot = PplProtocol(ctx=64, max_tokens=600)
    r_cpu = evaluate_quality({"b": base, "q": q}, "b", tokens, prot, None, device="cpu", progress=False)
    base.cuda(), q.cuda()
    r_gpu = evaluate_quality({"b": base, "q": q}, "b", tokens, prot, None, device="cuda", progress=False)
    for k in ("b", "q"):
        assert r_gpu[k].ppl == pytest.approx(r_cpu[k].ppl, rel=1e-4)
    assert r_gpu["q"].kl_mean == pytest.approx(r_cpu["q"].kl_mean, rel=1e-3, abs=1e-7)


def test_runner_gpu_memory_is_one_block_plus_activations():
    # A SmolLM2-135M-shaped model (random weights): the model stays on the CPU, the GPU holds one
    # block, the calibration activations (inputs and outputs of the current block) and temporaries.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    samples = torch.randint(0, 49152, (32, 512))
    torch.cuda.empty_cache()
    stats = run_sequential(model, make_method("rtn", QuantScheme(4, True, "group", 128)), samples, device="cuda",
                           batch_size=8, progress=False)
    MiB = 2**20
    print(f"\nGPU runner: largest block {stats.largest_block_bytes / MiB:.1f} MiB, activations "
          f"{stats.activation_bytes / MiB:.1f} MiB, CUDA peak {stats.cuda_peak_bytes / MiB:.1f} MiB, "
          f"model {fp32_bytes / MiB:.0f} MiB, {stats.seconds:.1f} s")
    # inputs + outputs of one block (2x activations), the block, and one batch's attention/MLP temporaries
    batch_tmp = 8 * 512 * (1536 * 3 + 9 * 512) * 4
    assert stats.cuda_peak_bytes < 2 * stats.activation_bytes + 2 * stats.largest_block_bytes + 2 * batch_tmp
    assert stats.cuda_peak_bytes < 0.75 * fp32_bytes


@pytest.mark.parametrize("method,scheme", [
    ("gptq", QuantScheme(4, False, "group", 32)),
    ("awq", QuantScheme(4, False, "group", 32)),
    ("hqq", QuantScheme(4, False, "group", 32, zero_point="float")),
    ("nf4", None),
    ("llm-int8", None),
])
def test_every_method_runs_on_cuda_like_on_cpu(method, scheme):
    cpu, gpu = tiny_llama(), tiny_llama()
    samples = _samples(4, 32)
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        m = make_method(method, scheme)
        if m.needs_calibration:
            run_sequential(model, m, samples, device=device, batch_size=2, progress=False)
        else:
            model.to(device)
            apply_data_free(model, m, progress=False)
            model.to("cpu")
    x = _samples(2, 20)
    with torch.no_grad():
        ref = tiny_llama()(x).logits
        l_cpu, l_gpu = cpu(x).logits, gpu(x).logits
    # same quality on both devices (solvers may round a few ties differently on the GPU)
    e_cpu = (l_cpu - ref).pow(2).mean().item()
    e_gpu = (l_gpu - ref).pow(2).mean().item()
    assert e_gpu == pytest.approx(e_cpu, rel=0.05, abs=1e-6)


def test_data_free_methods_honour_device():
    """apply_data_free works on the device (each block moved there and back), as the runner does."""
    a, b = tiny_llama(), tiny_llama()
    meth = make_method("rtn", SCHEME)
    seen = []
    apply = meth.apply
    meth.apply = lambda name, mod: (seen.append(mod.weight.device.type), apply(name, mod))[1]
    apply_data_free(a, meth, progress=False, device="cuda")
    assert set(seen) == {"cuda"}
    assert all(t.device.type == "cpu" for t in [*a.parameters(), *a.buffers()])  # blocks went back home
    run_sequential(b, make_method("rtn", SCHEME), _samples(), device="cuda", batch_size=3, progress=False)
    for (n1, m1), (n2, m2) in zip(a.named_modules(), b.named_modules()):
        if isinstance(m1, QuantizedLinear):  # same device, same arithmetic: same codes
            assert torch.equal(m1.qweight, m2.qweight) and torch.equal(m1.scales, m2.scales), n1


def test_streamed_quantization_on_cuda_uses_the_files_dtype(tmp_path):
    import json

    from lowbit import api
    from lowbit.models.tiny import tiny_model

    t = tiny_model("llama", seed=3)
    t.model.to(torch.bfloat16)
    t.model.save_pretrained(str(tmp_path / "src"), max_shard_size="50KB")
    t.tokenizer.save_pretrained(str(tmp_path / "src"))
    for method, kw in (("rtn", {}), ("gptq", dict(n_samples=4, seq_len=32))):
        m = api.load(str(tmp_path / "src"), device="cuda", stream=True)
        rec = api.quantize(m, method, SCHEME, device="cuda", output=str(tmp_path / method), progress=False, **kw)
        assert rec["dtype"] == "bfloat16" and rec["streaming"]
        assert json.loads((tmp_path / method / "lowbit.json").read_text())["device"] == "cuda"
        q = api.load(str(tmp_path / method))
        with torch.no_grad():
            assert torch.isfinite(q.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits).all()
