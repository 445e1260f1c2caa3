"""The sequential block runner and checkpoints: equal to whole-model quantization, bit-identical reloads."""

import copy
import json

import pytest
import torch

from lowbit.models import files as model_files
from torch import nn

from lowbit import checkpoint
from lowbit.algorithms.base import Method, make_method
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.families import find_blocks, linear_layers
from lowbit.nn.linear import QuantizedLinear
from tests.tiny import tiny_gemma3, tiny_llama

SCHEMES = [QuantScheme(4, True, "group", 32), QuantScheme(3, False, "group", 50), QuantScheme(8, True, "channel")]


def _samples(n=5, L=16, vocab=96, seed=1):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name())
def test_runner_equals_whole_model_rtn(make, scheme):
    direct, seq = make(), make()
    apply_data_free(direct, make_method("rtn", scheme), progress=False)
    stats = run_sequential(seq, make_method("rtn", scheme), _samples(), batch_size=2, progress=False)
    sd1, sd2 = direct.state_dict(), seq.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = _samples(2, 12, seed=9)
    with torch.no_grad():
        assert torch.equal(direct(x).logits, seq(x).logits)
    n_linear = sum(len(linear_layers(b)) for b in find_blocks(make()))
    assert sum(isinstance(m, QuantizedLinear) for m in seq.modules()) == n_linear == 7 * len(find_blocks(seq))
    assert sum(len(linear_layers(b)) for b in find_blocks(seq)) == 0  # nothing left unquantized
    assert stats.n_samples == 5 and stats.seq_len == 16
    assert stats.activation_bytes == 5 * 16 * seq.config.hidden_size * 4
    assert stats.peak_rss_bytes >= stats.rss_at_start_bytes > 0


class Recorder(Method):
    """Test method: records the inputs each linear layer sees, replaces nothing."""

    name = "recorder"
    needs_calibration = True

    def __init__(self):
        super().__init__(None)
        self.seen = {}

    def observe(self, name, module, x):
        self.seen.setdefault(name, []).append(x.detach().clone())

    def apply(self, name, module):
        return module.weight.detach()  # the same weight: the runner rebuilds an identical nn.Linear


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_runner_feeds_each_layer_what_the_full_model_feeds_it(make):
    # With a method that changes nothing, the runner's block-by-block inputs must equal the inputs
    # the layers see in one ordinary forward pass (this checks masks / rotary embeddings per block,
    # including Gemma 3's alternating sliding-window and full attention).
    model = make()
    samples = _samples(4, 16)
    full = {}
    hooks = []
    for i, blk in enumerate(find_blocks(model)):
        for name, lin in linear_layers(blk).items():
            key = f"model.layers.{i}.{name}"
            hooks.append(lin.register_forward_hook(lambda m, a, o, key=key: full.__setitem__(key, a[0].detach().clone())))
    with torch.no_grad():
        model(samples)
    for h in hooks:
        h.remove()
    rec = Recorder()
    run_sequential(model, rec, samples, batch_size=4, progress=False)
    assert set(rec.seen) == set(full)
    for k, xs in rec.seen.items():
        torch.testing.assert_close(torch.cat(xs), full[k], rtol=1e-5, atol=1e-5)


def test_runner_rejects_empty_samples():
    with pytest.raises(LowbitError, match="calibration samples"):
        run_sequential(tiny_llama(), make_method("rtn", SCHEMES[0]), torch.zeros(0, 8, dtype=torch.long))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.short_name())
def test_save_load_bit_identical_logits(tmp_path, make, scheme):
    model = make()
    apply_data_free(model, make_method("rtn", scheme), progress=False)
    rec = {"method": make_method("rtn", scheme).describe(), "base_model": {"kind": "test"}, "calibration": None}
    out = checkpoint.save(model, None, tmp_path / "q", rec)
    loaded, tok, rec2 = checkpoint.load(out)
    x = _samples(3, 20, seed=4)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert rec2["method"]["config"]["scheme"] == scheme.to_dict()
    assert rec2["lowbit_version"]
    assert len(rec2["modules"]) == sum(isinstance(m, QuantizedLinear) for m in model.modules())
    # no leftovers from the atomic write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_save_is_atomic_and_refuses_foreign_dirs(tmp_path, monkeypatch):
    model = tiny_llama()
    apply_data_free(model, make_method("rtn", SCHEMES[0]), progress=False)
    rec = {"method": {"method": "rtn"}, "base_model": {}}
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LowbitError, match="not a lowbit checkpoint"):
        checkpoint.save(model, None, foreign, rec)
    assert (foreign / "notes.txt").read_text() == "keep me"

    # a crash while writing tensors leaves neither the target nor a partial directory behind
    import lowbit.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        checkpoint.save(model, None, tmp_path / "out", rec)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_overwrite_existing_checkpoint_keeps_it_whole(tmp_path, monkeypatch):
    model = tiny_llama()
    apply_data_free(model, make_method("rtn", SCHEMES[0]), progress=False)
    rec = {"method": {"method": "rtn"}, "base_model": {}}
    checkpoint.save(model, None, tmp_path / "q", rec)
    import lowbit.checkpoint as ck

    monkeypatch.setattr(ck, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoint.save(model, None, tmp_path / "q", rec)
    assert checkpoint.is_checkpoint(tmp_path / "q")  # the old one is untouched
    checkpoint.load(tmp_path / "q")


def test_corrupt_checkpoint_errors(tmp_path):
    model = tiny_llama()
    apply_data_free(model, make_method("rtn", SCHEMES[0]), progress=False)
    out = checkpoint.save(model, None, tmp_path / "q", {"method": {"method": "rtn"}, "base_model": {}})
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(LowbitError, match="model.safetensors is corrupt: .* bytes"):  # the recorded size
        checkpoint.load(out)
    model_files.VERIFY_FILES = False
    try:
        with pytest.raises(LowbitError, match="corrupt or truncated"):  # the reader's own check
            checkpoint.load(out)
    finally:
        model_files.VERIFY_FILES = True
    (out / "lowbit.json").write_text("{not json")
    with pytest.raises(LowbitError, match="corrupt"):
        checkpoint.load(out)


def test_runner_batch_bounds_the_widest_activation():
    from lowbit.calibration.sequential import runner_batch

    def block(width):
        with torch.device("meta"):  # shapes only, as a streamed skeleton has
            return nn.Sequential(nn.Linear(2048, width), nn.Linear(width, 2048))

    assert runner_batch(block(1536), 512) == 8     # SmolLM2's MLP: all eight samples
    assert runner_batch(block(8192), 512) == 4     # Llama-3.2-1B: 16 MiB a sample at 512 tokens
    assert runner_batch(block(14336), 512) == 2    # Llama-3.1-8B
    assert runner_batch(block(8192), 4096) == 1    # never fewer than one
    assert runner_batch(block(1536), 512, largest=3) == 3


def test_runner_records_its_batch():
    model = tiny_llama()
    samples = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(0))
    stats = run_sequential(model, make_method("rtn", SCHEMES[0]), samples, progress=False)
    assert stats.batch_size == 8 and stats.n_samples == 5
    stats = run_sequential(tiny_llama(), make_method("rtn", SCHEMES[0]), samples, batch_size=2, progress=False)
    assert stats.batch_size == 2


def test_large_frees_go_back_to_the_system():
    """With the threshold the runners set, freed large tensors leave no resident heap behind; with
    glibc's default (a threshold that rises to the size of each large block freed) they do. Each in
    a fresh process, whose heap holds nothing else."""
    import subprocess
    import sys
    import textwrap

    probe = textwrap.dedent("""
        import sys, torch
        from lowbit.core import memory
        if sys.argv[1] == "fixed" and not memory.fixed_mmap_threshold():
            print("unsupported"); sys.exit()
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        big = torch.ones(30 << 18)  # a 30 MB block freed: glibc's default threshold rises to it
        del big
        base = rss()
        ts, keep = [], []
        for _ in range(8):  # 24 MB tensors, each followed by a small one that outlives it
            ts.append(torch.ones(6 << 20))
            keep.append(torch.ones(64))
        del ts
        print((rss() - base) >> 20)
    """)
    kept = {}
    for mode in ("fixed", "default"):
        r = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        if r.stdout.strip() == "unsupported":
            pytest.skip("not glibc")
        kept[mode] = int(r.stdout.strip())
    assert kept["fixed"] < 8 and kept["default"] > 24, kept
