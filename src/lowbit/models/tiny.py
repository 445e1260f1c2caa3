"""Tiny random-weight models of every supported family, for tests (no download, < 1 s).

    tiny_model("llama")            -> LoadedModel (in memory, eval, float32)
    save_tiny(path, "qwen2")       -> path of an HF directory (config + safetensors + tokenizer)
    tiny_tokenizer()               -> byte-level tokenizer: 256 byte tokens + <s>, </s>, <unk>

Shapes are small but not degenerate: 2 blocks, hidden 64, 4 query heads / 2 key-value heads
(grouped-query attention), head_dim 16, MLP 128, vocabulary 259 (every byte + 3 specials), so
that group sizes 16/32/64 divide every linear's input width.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from lowbit.models.families import family_for_type

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")  # ids 256, 257, 258
TINY_VOCAB = 256 + len(SPECIAL_TOKENS)


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values, in byte order (token id = byte value)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    extra = 0
    spelling = {}
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per UTF-8 byte, BOS <s> not added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(byte_alphabet())}
    for j, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + j
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(model_type: str = "llama", **overrides):
    """A transformers config of the given family with the tiny shape (overrides win)."""
    from transformers import AutoConfig

    fam = family_for_type(model_type)  # LowbitError for families lowbit does not support
    kw = dict(TINY_SHAPE, vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    kw.update(copy.deepcopy(fam.tiny))  # what the family's record asks of a tiny model (Gemma 3: a local and a global layer)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A random-weight causal LM of ``model_type`` with its tokenizer, as a LoadedModel."""
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import LoadedModel

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()
    source = {"kind": "tiny", "model_type": model_type, "seed": seed}
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), name=f"tiny-{model_type}", source=source)


def save_tiny(path: str | os.PathLike, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model + tokenizer as an HF directory at ``path``; return it."""
    path = Path(path)
    t = tiny_model(model_type, seed, **overrides)
    t.model.save_pretrained(str(path), safe_serialization=True)
    t.tokenizer.save_pretrained(str(path))
    return path


__all__ = ["TINY_SHAPE", "TINY_VOCAB", "byte_alphabet", "save_tiny", "tiny_config", "tiny_model",
           "tiny_tokenizer"]
