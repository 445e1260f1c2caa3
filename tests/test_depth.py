"""Depth students: dropping decoder blocks (weights, config, KV cache, save/reload) and the two
block-importance scores (a block made an exact identity scores 0 and is dropped first)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.models.families import FAMILIES, family_of, find_blocks
from lowbit.models.tiny import tiny_model
from lowbit.training.depth import block_scores, choose_drop, drop_blocks
from tests.tiny import tiny_gemma3, tiny_llama


@pytest.fixture(autouse=True)
def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield


def _ids(vocab: int, n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


def _models():
    """(name, model) of every family: the tests' own tiny llama / gemma3, and lowbit's tiny qwen3,
    qwen2 (sliding window from layer 2 on) and mistral with four blocks."""
    out = [("llama", tiny_llama()), ("gemma3", tiny_gemma3())]
    extra = {"qwen3": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
             "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
             "mistral": dict(sliding_window=4)}
    for model_type, kw in extra.items():
        if model_type in FAMILIES:
            out.append((model_type, tiny_model(model_type, num_hidden_layers=4, **kw).model))
    return out


MODELS = _models()
IDS = [name for name, _ in MODELS]


@pytest.mark.parametrize("name,teacher", MODELS, ids=IDS)
def test_kept_blocks_are_copies_of_the_teachers(name, teacher):
    n = len(find_blocks(teacher))
    keep = [0, n - 1]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = drop_blocks(teacher, keep)
    t_blocks, s_blocks = find_blocks(teacher), find_blocks(student)
    assert len(t_blocks) == n and len(s_blocks) == 2
    for j, k in enumerate(keep):
        t_params, s_params = dict(t_blocks[k].named_parameters()), dict(s_blocks[j].named_parameters())
        assert t_params.keys() == s_params.keys()
        for p, t in t_params.items():
            s = s_params[p]
            assert torch.equal(s, t), p
            assert s.data_ptr() != t.data_ptr(), f"{p} shares storage with the teacher"
    with torch.no_grad():  # changing the student leaves the teacher as it was
        for p in student.parameters():
            p.add_(1.0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert teacher.config.num_hidden_layers == n


@pytest.mark.parametrize("name,teacher", MODELS, ids=IDS)
def test_config_and_layer_indices_describe_the_new_stack(name, teacher):
    n = len(find_blocks(teacher))
    keep = [0, *range(2, n)]  # block 1 dropped: later blocks move down one cache slot
    old_types = list(getattr(teacher.config, "layer_types", None) or [])
    student = drop_blocks(teacher, keep)
    cfg = student.config
    assert cfg.num_hidden_layers == n - 1 and teacher.config.num_hidden_layers == n
    if old_types:
        assert list(cfg.layer_types) == [old_types[k] for k in keep]
        assert list(teacher.config.layer_types) == old_types
    if getattr(teacher.config, "max_window_layers", None) is not None:
        assert cfg.max_window_layers == sum(k < teacher.config.max_window_layers for k in keep)
    for j, block in enumerate(find_blocks(student)):
        indices = [m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")]
        assert indices and all(i == j for i in indices), (j, indices)
        assert block.self_attn.config is cfg  # submodules read the student's config, not the teacher's


def test_gemma3_keeps_each_blocks_attention_kind():
    teacher = tiny_gemma3()  # layer types: sliding, sliding, full, sliding
    student = drop_blocks(teacher, [1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert [b.self_attn.is_sliding for b in find_blocks(student)] == [True, False]


@pytest.mark.parametrize("name,teacher", MODELS, ids=IDS)
def test_generate_with_cache_equals_without(name, teacher):
    student = drop_blocks(teacher, [0, *range(2, len(find_blocks(teacher)))])
    x = _ids(student.config.vocab_size, n=1, length=5, seed=3)
    kw = dict(max_new_tokens=7, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = student.generate(x, use_cache=True, **kw)
        plain = student.generate(x, use_cache=False, **kw)
    assert cached.shape[1] == x.shape[1] + 7  # past gemma3's sliding window of 4
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("name,teacher", MODELS[:2], ids=IDS[:2])
def test_keeping_every_block_gives_the_teachers_logits(name, teacher):
    n = len(find_blocks(teacher))
    student = drop_blocks(teacher, list(range(n)))
    x = _ids(teacher.config.vocab_size)
    assert torch.equal(_logits(student, x), _logits(teacher, x))


@pytest.mark.parametrize("name,teacher", MODELS[:2], ids=IDS[:2])
def test_save_and_reload_gives_identical_logits(name, teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    student = drop_blocks(teacher, [1, 2])
    student.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.config.num_hidden_layers == 2
    assert getattr(again.config, "layer_types", None) == getattr(student.config, "layer_types", None)
    x = _ids(teacher.config.vocab_size)
    assert torch.equal(_logits(again, x), _logits(student, x))


@pytest.mark.parametrize("keep,needle", [
    ([], "keep is empty"),
    ([0, 9], "block index 9 in keep is out of range: the model has 3 blocks"),
    ([-1, 1], "block index -1"),
    ([2, 1], "sorted"),
    ([1, 1], "without repeats"),
    ([0, 1.0], "integer block indices"),
    ([True], "integer block indices"),
    ("01", "list of block indices"),
])
def test_bad_keep_lists_raise_one_line(keep, needle):
    with pytest.raises(LowbitError) as e:
        drop_blocks(tiny_llama(), keep)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def _with_identity_block(model, i):
    """Block ``i`` adds nothing to the residual stream: its attention and MLP outputs are zero."""
    block = find_blocks(model)[i]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_an_identity_block_scores_zero_and_is_dropped_first(make):
    model = _with_identity_block(make(), 1)
    x = _ids(model.config.vocab_size, n=3, length=10, seed=1)
    kl = block_scores(model, x, "kl", progress=False)
    bi = block_scores(model, x, "bi", progress=False)
    n = len(find_blocks(model))
    assert len(kl) == len(bi) == n
    assert 0 <= kl[1] <= 1e-6 and abs(bi[1]) <= 1e-6, (kl, bi)
    assert min(s for i, s in enumerate(kl) if i != 1) > 1e-4  # the others change the output
    assert min(range(n), key=kl.__getitem__) == 1
    assert min(range(n), key=bi.__getitem__) == 1
    assert choose_drop(kl, 1) == [i for i in range(n) if i != 1]
    assert choose_drop(bi, 1) == [i for i in range(n) if i != 1]


def test_kl_score_is_the_kl_of_the_model_without_the_block():
    """The hook-skipped block scores what the real student without that block measures."""
    model = tiny_llama()
    x = _ids(model.config.vocab_size, n=2, length=8, seed=2)
    kl = block_scores(model, x, "kl", progress=False)
    for i in range(3):
        student = drop_blocks(model, [k for k in range(3) if k != i])
        p = torch.log_softmax(_logits(model, x).double(), -1)
        q = torch.log_softmax(_logits(student, x).double(), -1)
        ref = float((p.exp() * (p - q)).sum(-1).mean())
        assert kl[i] == pytest.approx(ref, rel=1e-4, abs=1e-9)


def test_bi_score_is_one_minus_the_mean_cosine():
    model = tiny_gemma3()
    x = _ids(model.config.vocab_size, n=2, length=8, seed=4)
    with torch.no_grad():
        hs = model(input_ids=x, use_cache=False, output_hidden_states=True).hidden_states
    bi = block_scores(model, x, "bi", progress=False)
    n = len(find_blocks(model))
    for i in range(n - 1):  # the last entry of hidden_states is after the final norm
        cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
        assert bi[i] == pytest.approx(1 - float(cos.mean()), abs=1e-6)


def test_choose_drop_keeps_the_ends_until_it_must():
    scores = [0.1, 5.0, 0.2, 3.0, 0.05]
    assert choose_drop(scores, 0) == [0, 1, 2, 3, 4]
    assert choose_drop(scores, 1) == [0, 1, 3, 4]  # block 2, not the lower-scored ends 0 and 4
    assert choose_drop(scores, 2) == [0, 1, 4]
    assert choose_drop(scores, 3) == [0, 4]
    assert choose_drop(scores, 4) == [0]  # forced: the lower-scored end (4) goes
    assert choose_drop([1.0, 1.0, 1.0, 1.0], 1) == [0, 2, 3]  # ties: lower index first
    assert choose_drop([2.0, 1.0], 1) == [0]
    for bad in (5, -1, 1.5):
        with pytest.raises(LowbitError, match="cannot drop"):
            choose_drop(scores, bad)
    with pytest.raises(LowbitError, match="NaN"):
        choose_drop([1.0, float("nan"), 2.0], 1)


def test_block_scores_rejects_bad_input():
    model = tiny_llama()
    with pytest.raises(LowbitError, match="unknown block score method 'cos'"):
        block_scores(model, _ids(96), "cos", progress=False)
    with pytest.raises(LowbitError, match="LongTensor"):
        block_scores(model, torch.zeros(2, 4), progress=False)
    with pytest.raises(LowbitError, match="LongTensor"):
        block_scores(model, _ids(96)[0], progress=False)


def test_family_record_is_what_drop_blocks_reads():
    """drop_blocks finds the blocks through the family record (no per-type branches)."""
    teacher = tiny_llama()
    assert family_of(drop_blocks(teacher, [1])) is family_of(teacher)
