"""Random-weight models with the exact shapes of real LLMs, for measuring memory and time.

    python bench/synthetic_model.py llama-3.2-1b                  # -> out/synthetic/llama-3.2-1b  (2.5 GB)
    python bench/synthetic_model.py llama-3.1-8b                  # -> out/synthetic/llama-3.1-8b  (16 GB)
    python bench/synthetic_model.py qwen2.5-7b --out DIR --seed 1 --max-shard-size 2GB
    python bench/synthetic_model.py llama-3.1-8b --tiny           # the same structure, tiny widths (tests)

Each model is an ordinary Hugging Face directory: the published ``config.json`` of the real model
(hidden size, layers, heads, key-value heads, MLP width, vocabulary, RoPE settings, tied or untied
embeddings; Qwen2's q/k/v biases follow from its model type), bfloat16 safetensors sharded as the
Hub does (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``; one
``model.safetensors`` when everything fits in one shard), a tokenizer, and ``synthetic.json``
saying how it was made. The weights are random (normal, std 0.02; norm weights 1): the quality
of these models means nothing, their memory and time do.

Tokenizer: SmolLM2's (vocabulary 49,152, from lowbit's builtin model cache), or ``--tokenizer
DIR``. The config keeps the real vocabulary (128,256 for Llama 3, 152,064 for Qwen2.5), so the
embedding and output layers have their real sizes; token ids beyond the tokenizer's vocabulary
are never produced by it, so they never reach the model as inputs.

Memory: the tensor names and shapes come from transformers' own model built on the meta device
(no memory); each tensor is then generated in chunks of rows and streamed into its shard, so the
script's peak memory is a chunk (64 MiB) plus the Python/torch baseline, whatever the model size.
Deterministic: every tensor draws from its own generator seeded by (seed, tensor name), so the
bytes do not depend on the shard size. Atomic: the directory is assembled beside its final name
and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import zlib
from pathlib import Path

# run as a script, bench/ heads sys.path and bench/kernels.py would shadow the `kernels` package
# transformers probes for when it builds a model
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

# The published config.json of each model (Hugging Face Hub, base models).
MODELS: dict[str, dict] = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192, "head_dim": 64,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "bos_token_id": 128000, "eos_token_id": 128001,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "max_position_embeddings": 131072,
        "max_window_layers": 28, "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
        "use_mrope": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 152064,
    },
}
# --tiny: the same family, RoPE, tying, biases and vocabulary, with test-sized widths and depth
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
STD = 0.02
CHUNK_BYTES = 64 * 2**20  # float32 bytes generated at a time
DTYPE = torch.bfloat16
SAFETENSORS_DTYPE = "BF16"
DEFAULT_SHARD = "5GB"


def model_config(name: str, tiny: bool = False) -> dict:
    if name not in MODELS:
        raise SystemExit(f"synthetic_model: unknown model {name!r}; choose from {', '.join(MODELS)}")
    cfg = dict(MODELS[name])
    if tiny:
        cfg.update(TINY)
        if "head_dim" not in MODELS[name]:
            cfg.pop("head_dim")  # hidden_size / num_attention_heads = 16 as well
    return cfg


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in the model's order: transformers' own model for
    this config, built on the meta device. A tied output layer is stored once (as the embedding)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    specs, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue  # tied: the same tensor under a second name
        seen.add(id(t))
        specs.append((name, tuple(t.shape)))
    if cfg.get("tie_word_embeddings"):
        specs = [(n, s) for n, s in specs if n != "lm_head.weight"]
    return specs


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise SystemExit(f"synthetic_model: size {text!r} is not like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def nbytes(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * DTYPE.itemsize


def plan_shards(specs, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors per shard, each shard at most max_bytes (a larger tensor alone)."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        b = nbytes(shape)
        if cur and size + b > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += b
    if cur:
        shards.append(cur)
    return shards


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def tensor_chunks(seed: int, name: str, shape: tuple[int, ...]):
    """The tensor's values in bfloat16, as consecutive flat chunks of about CHUNK_BYTES of float32."""
    n = nbytes(shape) // DTYPE.itemsize
    if re.search(r"norm[^.]*\.weight$", name):  # RMSNorm scales: 1 (Gemma-style offsets do not occur here)
        step = CHUNK_BYTES // 4
        for start in range(0, n, step):
            yield torch.ones(min(step, n - start), dtype=DTYPE)
        return
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    step = CHUNK_BYTES // 4
    for start in range(0, n, step):
        yield torch.randn(min(step, n - start), generator=g).mul_(STD).to(DTYPE)


def write_safetensors(path: Path, specs, seed: int, bar) -> None:
    """Stream one safetensors file: header (all offsets known from the shapes), then each tensor's
    bytes chunk by chunk. The layout is safetensors' own: an 8-byte little-endian header length,
    the JSON header padded with spaces to a multiple of 8, then the tensors back to back."""
    header, offset = {}, 0
    for name, shape in specs:
        header[name] = {"dtype": SAFETENSORS_DTYPE, "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            for chunk in tensor_chunks(seed, name, shape):
                f.write(chunk.view(torch.uint8).numpy().data)
                bar.update(chunk.numel() * DTYPE.itemsize)


def save_tokenizer(out: Path, tokenizer_dir: str | None) -> str:
    from transformers import AutoTokenizer

    if tokenizer_dir is None:
        from lowbit.models import builtin

        if not builtin.is_cached(builtin.DEFAULT_MODEL):
            builtin.load_builtin(builtin.DEFAULT_MODEL)  # fetch and cache it once
        tokenizer_dir = str(builtin.cache_path(builtin.DEFAULT_MODEL))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tok.save_pretrained(str(out))
    return tokenizer_dir


def write_model(name: str, out: str | Path, *, seed: int = 0, max_shard_size: str = DEFAULT_SHARD,
                tiny: bool = False, tokenizer: str | None = None, progress: bool = True) -> Path:
    from lowbit.outputs import atomic_dir

    cfg = model_config(name, tiny)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs, parse_size(max_shard_size))
    total = sum(nbytes(s) for _, s in specs)
    out = Path(out)
    with atomic_dir(out) as tmp:
        tok_src = save_tokenizer(tmp, tokenizer)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        files = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"{name}{' (tiny)' if tiny else ''}",
                  disable=not progress) as bar:
            for file, shard in zip(files, shards):
                write_safetensors(tmp / file, shard, seed, bar)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: file for file, shard in zip(files, shards) for n, _ in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        info = {"synthetic": True, "model": name, "tiny": tiny, "seed": seed, "std": STD,
                "dtype": str(DTYPE).removeprefix("torch."), "bytes": total, "n_tensors": len(specs),
                "shards": len(shards), "tokenizer": Path(tok_src).name}
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--out", default=None, help="output directory (default out/synthetic/<model>[-tiny])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default=DEFAULT_SHARD, help="largest shard, e.g. 5GB (default), 500MB")
    ap.add_argument("--tiny", action="store_true", help="test-sized widths and depth, same structure and vocabulary")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: SmolLM2's)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    out = args.out or f"out/synthetic/{args.model}{'-tiny' if args.tiny else ''}"
    path = write_model(args.model, out, seed=args.seed, max_shard_size=args.max_shard_size, tiny=args.tiny,
                       tokenizer=args.tokenizer, progress=not args.quiet)
    info = json.loads((path / "synthetic.json").read_text())
    print(f"{path}: {info['n_tensors']} tensors, {info['bytes'] / 1e9:.2f} GB in {info['shards']} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
