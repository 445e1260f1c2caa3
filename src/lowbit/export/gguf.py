"""Write a model as a GGUF file that llama.cpp (and transformers) load.

    export_gguf(model, "out.gguf", qtype="Q4_K_M", imatrix=None) -> ExportReport

``model`` is a `lowbit.api.Model` (or anything with ``.model``, ``.tokenizer`` and ``.source``):
a float model, or a lowbit quantized checkpoint, whose packed linears are *dequantized* first and
then re-quantized to the GGUF block types, except where a layer's own codes fit the type it gets
(below: affine layers in Q8_0 / Q4_0 / Q5_0 / Q4_1 / Q5_1, BitNet layers in TQ2_0 / TQ1_0 / Q4_0).

What goes into the file
-----------------------
* architecture metadata (``{arch}.block_count``, ``embedding_length``, heads, rope, norm eps, ...)
  from the HF config, under the llama.cpp architecture name of the family;
* the tokenizer: copied verbatim (every ``tokenizer.*`` key) from the GGUF the model was loaded
  from when there is one (the builtin models came from GGUFs: their tokenizer metadata is kept in
  lowbit's cache), else converted from the HF tokenizer (byte-level BPE only);
* tensors under llama.cpp's names, as the family's record (`lowbit.models.families.Family`) maps
  them (`gguf_name`); ``attn_q`` / ``attn_k`` rows permuted back into GGUF's rotary layout where
  the record's GGUF architecture asks for it (llama, mistral: `permute_qk`, the inverse of what
  transformers undoes on load); RMSNorm gains stored as offset + w (Gemma 3: 1 + w), as llama.cpp
  reads them; a tied ``lm_head`` is not written (llama.cpp reuses ``token_embd``);
* every 2-D weight in the type chosen by `choose_types`, 1-D tensors (norms, biases) in F32.

Writes are atomic: the file is built under a temporary name in the target directory and renamed
over the target only when complete.

Per-tensor type rules (llama.cpp ``llama_tensor_get_type``, for dense decoder models)
--------------------------------------------------------------------------------------
``--type`` is either a single block type ("pure": every 2-D weight gets it) or one of the named
mixes below, whose base type is the K-quant in the name. ``i`` is the block index, ``n`` the
number of blocks; ``more(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division).

=======================  ==========================  ==========================  ==========================
tensor                   Q3_K_M (base Q3_K)          Q4_K_M (base Q4_K)          Q5_K_M (base Q5_K)
=======================  ==========================  ==========================  ==========================
output (or tied embd)    Q6_K                        Q6_K                        Q6_K
token_embd (untied)      base                        base                        base
attn_v                   Q5_K if i < 2 else Q4_K     Q6_K if more(i) else base   Q6_K if more(i) else base
attn_output              Q4_K                        base                        base
ffn_down                 Q5_K if i < n/16 else Q4_K  Q6_K if more(i) else base   Q6_K if more(i) else base
attn_q/k, ffn_gate/up    base                        base                        base
=======================  ==========================  ==========================  ==========================

The output rule also applies to pure quantized types other than Q8_0 (llama.cpp does this for
every quantized file type): the output matrix (or the tied embedding) gets Q6_K. Pure types are
otherwise applied as given. Then, for every type: a tensor whose row length is not a multiple of
the chosen type's block size falls back (as llama.cpp): Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q2_K / Q3_K -> IQ4_NL, TQ1_0 / TQ2_0 -> Q4_0, and to F16 if even that does not
divide the row. (An output row length not divisible by the base block size gives Q8_0 directly.)
Not reproduced: llama.cpp's special cases for 70B models, mixture-of-experts and Falcon.

BitNet layers: ternary codes written as they are
------------------------------------------------
A linear stored as `lowbit.formats.bitnet.BitNetWeight` (a trained BitLinear: codes W~ in
{-1, 0, 1}, or ±1 for 1-bit, and one float16-exact scale β) is not re-quantized: its codes and
scale go into the blocks unchanged (`gguf_quants.encode_ternary`), so the tensor dequantizes to
exactly β·W~. Its type is TQ1_0 when ``qtype`` is TQ1_0, else TQ2_0 (whatever ``qtype`` says for
the other tensors); a row that is not a multiple of 256 gets Q4_0 with d = β, q = W~ + 8 (exact
as well; llama.cpp's Q4_0 quantizer would not be), and F16 if not even 32 divides it. Every other
tensor follows the rules above for ``qtype`` (so the token embedding of a BitNet checkpoint is
Q8_0 under the default Q8_0; under TQ2_0 it is Q6_K, or Q8_0 where its rows are not a multiple
of 256, when tied, and Q4_K when untied). A BitNet layer with its own RMSNorm (``norm=True``)
cannot be written: llama.cpp's graph for these architectures has no norm inside a linear.
At run time llama.cpp quantizes the activations its own way (Q8_K per 256 values for TQ types,
Q8_0 per 32 for Q4_0) instead of BitNet's int8 per token, so its output is close to, not equal
to, lowbit's.

Affine layers (GPTQ, RTN, AWQ, ...): codes written as they are
--------------------------------------------------------------
A linear stored as `lowbit.formats.affine.AffineWeight` whose tensor gets a legacy block type
(from ``qtype``, or from a mix's rules and fallbacks, which are not changed) that can hold its
grid is written with its own codes and scales (`affine_carry`, `gguf_quants.encode_codes`), so the
tensor dequantizes to exactly ``AffineWeight.dequantize()`` instead of being quantized a second
time. That needs: every lowbit group a whole number of 32-blocks (group size a multiple of 32,
or per channel / per tensor; each block then gets its group's scale as d), float16 scales (float32
ones that are all float16 values also do), and codes on the type's grid: symmetric codes in
-128..127 for Q8_0, -16..15 for Q5_0, -8..7 for Q4_0 (full or restricted range; so 4-bit codes also
fit Q5_0 and Q8_0), asymmetric codes with an integer zero-point as c = u - z where its range fits
(Q8_0 up to 7 bits, Q5_0 up to 4, Q4_0 up to 3). Q4_1 / Q5_1 (d * u + m) take asymmetric codes u
(up to 4 / 5 bits) only where m = -d * z is a float16 in every block and the blocks give the
layer's values bit for bit (checked; with lowbit's zero-points that rarely holds, and the layer
is then re-quantized). K-quants are never carried (their sub-block scales are themselves quantized).
Every other affine layer is re-quantized from its dequantized weight; the report lists both
(``carried``: name -> type, ``requantized``: name -> why). q/k rows are permuted as codes.

GGUF-block layers (GPTQ with gguf_type): blocks written as they are
--------------------------------------------------------------------
A linear stored as `lowbit.formats.gguf_blocks.GGUFBlockWeight` already is the blocks of one GGUF
type (`lowbit.export.gguf_grid.gptq_onto`): it is written as that type with its bytes unchanged
(q/k rows permuted as whole rows, which are independent), whatever type ``qtype``'s rules would
give the tensor, and listed in ``carried``. Only an explicit ``tensor_types`` entry with another
type re-quantizes it (from its dequantized weight; listed in ``requantized``).

Per-tensor types
----------------
``tensor_types`` maps GGUF tensor names to types that override the rules above (and a GGUF-block
layer's own type), so a caller can write any per-tensor mix; each must be a known type (F32 for a
1-D tensor) whose blocks divide the tensor's rows (`check_tensor_types`, a one-line error
otherwise; no fallback is applied to an explicit choice).

Importance matrix
-----------------
``imatrix`` maps GGUF tensor names to per-input-column weights (mean squared activation of that
linear's input over calibration text, `collect_imatrix`). The K-quant and legacy block
quantizers then weight their scale searches by it (`lowbit.export.gguf_imatrix`), as llama.cpp's
``quantize_*`` do when given ``quant_weights`` (bytes identical to llama.cpp's).

Status: without an importance matrix every tensor is byte-identical to what llama.cpp's own
quantizer (``llama_model_quantize``) writes from the same (F16-exact) weights, mixes included
(tests/test_gguf_export.py on a tiny model; bench/gguf_llamacpp.py on SmolLM2); Gemma-3-270M's
Q4_K_M gets the same type for each of its 236 tensors as the published llama.cpp Q4_K_M file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lowbit import outputs
from lowbit.errors import LowbitError
from lowbit.version import __version__
from lowbit.models.gguf_check import DIGEST_KEY, PLACEHOLDER, VERSION_KEY, stamp_digest
from lowbit.export import gguf_quants
from lowbit.models.families import FAMILIES, Family, family_of

# --------------------------------------------------------------------------------------------
# types
# --------------------------------------------------------------------------------------------

PURE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
              "Q5_K", "Q6_K", "TQ1_0", "TQ2_0")
MIXES = {"Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
EXPORT_TYPES = PURE_TYPES + tuple(MIXES)

# general.file_type (llama.cpp's llama_ftype) written for each --type; a pure K type is recorded as
# the "_S" file type of that base, the closest llama.cpp name.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 11, "Q3_K_M": 12, "Q4_K": 14, "Q4_K_M": 15, "Q5_K": 16, "Q5_K_M": 17,
              "Q6_K": 18, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37}

# llama.cpp's fallback when a row is not a whole number of blocks of the chosen type
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL",
            "TQ1_0": "Q4_0", "TQ2_0": "Q4_0"}

QUANTIZED = set(PURE_TYPES) - {"F32", "F16", "BF16"}


def _block_size(t: str) -> int:
    return 1 if t == "F32" else gguf_quants.layout(t)[0]


def fit_row(t: str, nx: int) -> str:
    """``t``, or llama.cpp's fallback for it (`FALLBACK`, then F16) when a row of ``nx`` values is
    not a whole number of its blocks."""
    if nx % _block_size(t):
        t = FALLBACK.get(t, "F16")
        if nx % _block_size(t):
            t = "F16"
    return t


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block_index(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def ternary_type(qtype: str) -> str:
    """The GGUF type of a BitNet layer in a file written as ``qtype``: TQ1_0 if asked, else TQ2_0."""
    return "TQ1_0" if qtype == "TQ1_0" else "TQ2_0"


def _ternary_rule(nx: int, qtype: str) -> str:
    for t in (ternary_type(qtype), "Q4_0"):  # both carry d * {-1, 0, 1} exactly
        if nx % _block_size(t) == 0:
            return t
    return "F16"  # β is float16-exact, so ±β and 0 are too


def choose_types(shapes: dict[str, tuple[int, ...]], qtype: str, n_layer: int,
                 ternary: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    """The GGUF type of every tensor of a model to be written as ``qtype`` (see the module table).

    ``shapes`` maps GGUF tensor names to torch shapes (rows, row length) in the order they will be
    written. 1-D tensors get F32. Names in ``ternary`` (BitNet layers) get `ternary_type`, or Q4_0
    (then F16) where their rows are not a whole number of its blocks."""
    if qtype not in EXPORT_TYPES:
        raise LowbitError(f"unknown GGUF export type {qtype!r}; choose one of {', '.join(EXPORT_TYPES)}")
    mix = qtype if qtype in MIXES else None
    base = MIXES.get(qtype, qtype)
    has_output = "output.weight" in shapes
    out: dict[str, str] = {}
    for name, shape in shapes.items():
        if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
            out[name] = "F32"
            continue
        if name in ternary:
            out[name] = _ternary_rule(shape[-1], qtype)
            continue
        t = base
        if base in QUANTIZED:
            t = fit_row(_rule(name, shape, base, mix, n_layer, has_output), shape[-1])
        out[name] = t
    return out


def _rule(name: str, shape, base: str, mix: str | None, n: int, has_output: bool) -> str:
    i = _block_index(name)
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if shape[-1] % _block_size(base):
            return "Q8_0"
        return base if base == "Q8_0" else "Q6_K"
    if name == "token_embd.weight":
        return "Q4_K" if base in ("TQ1_0", "TQ2_0") else base
    if mix is None or i is None:
        return base
    if ".attn_v." in name:
        if mix == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        return "Q6_K" if _more_bits(i, n) else base
    if ".ffn_down" in name:
        if mix == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        return "Q6_K" if _more_bits(i, n) else base
    if ".attn_output." in name and mix == "Q3_K_M":
        return "Q4_K"
    return base


# --------------------------------------------------------------------------------------------
# families: names, permutation, metadata
# --------------------------------------------------------------------------------------------

def gguf_name(hf_name: str, family: Family | None = None) -> str:
    """The GGUF tensor name of an HF parameter name, by the family's record (default: llama);
    LowbitError for names it has no place for."""
    fam = family or FAMILIES["llama"]
    top = fam.gguf_top_names
    if hf_name in top:
        return top[hf_name]
    m = re.fullmatch(rf"{re.escape(fam.blocks)}\.(\d+)\.(.+)", hf_name)
    block_names = fam.gguf_block_names
    if m and m.group(2) in block_names:
        return f"blk.{m.group(1)}.{block_names[m.group(2)]}"
    raise LowbitError(f"no GGUF tensor name for parameter {hf_name!r}")


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout -> GGUF (llama.cpp) layout of a q or k projection's rows.

    HF rotates the two halves of each head's dimensions ([x0..x_{d/2-1}] with [x_{d/2}..]);
    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... So within each head the row order
    goes from [half 0, half 1] to interleaved: new row 2j + h = old row h * d/2 + j."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise LowbitError(f"cannot permute {rows} rows into {n_head} heads of even size")
    d2 = rows // n_head // 2
    return w.reshape(n_head, 2, d2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk` (GGUF -> HF)."""
    rows = w.shape[0]
    d2 = rows // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _rope_theta(config) -> float | None:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):
        rp = rp["full_attention"]  # per layer type (Gemma 3): llama.cpp takes the global layers' theta
    if isinstance(rp, dict) and rp.get("rope_theta") is not None:
        return float(rp["rope_theta"])
    v = getattr(config, "rope_theta", None)
    return float(v) if v is not None else None


def _rope_scaling(config) -> dict | None:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    parts = [v for v in rp.values() if isinstance(v, dict)] if isinstance(rp, dict) else []
    for r in parts or [rp]:
        if isinstance(r, dict) and r.get("rope_type", r.get("type", "default")) not in ("default", None):
            return r
    return None


def architecture_metadata(config, family: Family) -> dict[str, tuple[object, str]]:
    """``{key: (value, gguf value type name)}`` of the architecture hyper-parameters, as the
    family's llama.cpp architecture (`Family.gguf`) reads them."""
    g = family.gguf
    arch = g.name
    n_head = int(config.num_attention_heads)
    n_kv = int(_cfg(config, "num_key_value_heads", default=n_head))
    hidden = int(config.hidden_size)
    head_dim = int(_cfg(config, "head_dim", default=hidden // n_head))
    if _rope_scaling(config) is not None:
        raise LowbitError(f"GGUF export of rope scaling {_rope_scaling(config)} is not supported")
    md = {
        f"{arch}.context_length": (int(config.max_position_embeddings), "UINT32"),
        f"{arch}.embedding_length": (hidden, "UINT32"),
        f"{arch}.block_count": (int(config.num_hidden_layers), "UINT32"),
        f"{arch}.feed_forward_length": (int(config.intermediate_size), "UINT32"),
        f"{arch}.attention.head_count": (n_head, "UINT32"),
        f"{arch}.attention.head_count_kv": (n_kv, "UINT32"),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "FLOAT32"),
        f"{arch}.vocab_size": (int(config.vocab_size), "UINT32"),
        f"{arch}.rope.dimension_count": (head_dim, "UINT32"),
    }
    theta = _rope_theta(config)
    if theta is not None:
        md[f"{arch}.rope.freq_base"] = (theta, "FLOAT32")
    if head_dim != hidden // n_head or g.head_dim_keys:
        md[f"{arch}.attention.key_length"] = (head_dim, "UINT32")
        md[f"{arch}.attention.value_length"] = (head_dim, "UINT32")
    if g.global_every:
        # llama.cpp fixes the local/global pattern (Gemma 3: every 6th layer global, local rope base 10^4)
        n = g.global_every
        types = list(getattr(config, "layer_types", None) or [])
        if types and types != [("full_attention" if (i + 1) % n == 0 else "sliding_attention") for i in range(len(types))]:
            raise LowbitError(f"GGUF (llama.cpp) {arch} needs every {n}th layer global; this model's layer_types differ")
        md[f"{arch}.attention.sliding_window"] = (int(config.sliding_window), "UINT32")
    if family.attn_scale:
        qpas = getattr(config, family.attn_scale, head_dim)
        if qpas != head_dim:
            raise LowbitError(f"GGUF (llama.cpp) {arch} scales attention by 1/sqrt(head_dim = {head_dim}); "
                              f"this model's {family.attn_scale} is {qpas}")
    for k in g.omit:
        md.pop(f"{arch}.{k}")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise LowbitError(f"GGUF export of {arch} with {key} is not supported")
    return md


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_PREFIX = "tokenizer."

# llama.cpp's pre-tokenizer names for the HF pre-tokenizer shapes we recognise
_GPT2_REGEX_NAME = "gpt-2"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp ``tokenizer.ggml.pre`` for an HF byte-level BPE pre-tokenizer (tokenizer.json)."""
    def is_bytelevel(p, regex=True):
        return isinstance(p, dict) and p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if is_bytelevel(pre):
        return _GPT2_REGEX_NAME
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        seq = pre.get("pretokenizers") or []
        if (len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits")
                and is_bytelevel(seq[1])):
            return "smollm"
        if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("behavior") == "Isolated"
                and not seq[0].get("invert") and (seq[0].get("pattern") or {}).get("Regex") == _QWEN2_REGEX
                and is_bytelevel(seq[1], regex=False)):
            return "qwen2"
    raise LowbitError(
        f"cannot convert this tokenizer to GGUF: pre-tokenizer {json.dumps(pre)[:120]} is not one lowbit "
        "knows (byte-level GPT-2, SmolLM or Qwen2); export from a model loaded from a GGUF file instead"
    )


def tokenizer_metadata_from_hf(tokenizer, vocab_size: int) -> dict[str, tuple[object, str]]:
    """GGUF tokenizer metadata (llama.cpp "gpt2" byte-level BPE) converted from an HF fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LowbitError(f"cannot convert a {type(tokenizer).__name__} to GGUF: not a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise LowbitError(
            f"cannot convert this tokenizer to GGUF: only byte-level BPE is supported (got {model.get('type')}); "
            "export from a model loaded from a GGUF file instead"
        )
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab: dict[str, int] = dict(model["vocab"])
    # added (special) tokens past the embedding can never be scored or produced by the model; the
    # GGUF vocabulary has exactly one entry per embedding row, so they are left out
    added = {t["id"]: t for t in spec.get("added_tokens") or [] if t["id"] < vocab_size}
    for i, t in added.items():
        vocab[t["content"]] = i
    n = max(vocab_size, max(vocab.values()) + 1)
    if n > vocab_size:
        raise LowbitError(f"the tokenizer has ids up to {n - 1} but the embedding has only {vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 1  # NORMAL
    for i, t in added.items():
        types[i] = 3 if t.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    from lowbit.data.texts import default_bos_id

    md: dict[str, tuple[object, str]] = {
        "tokenizer.ggml.model": ("gpt2", "STRING"),
        "tokenizer.ggml.pre": (pre, "STRING"),
        "tokenizer.ggml.tokens": (tokens, "ARRAY:STRING"),
        "tokenizer.ggml.token_type": (types, "ARRAY:INT32"),
        "tokenizer.ggml.merges": (merges, "ARRAY:STRING"),
        "tokenizer.ggml.add_bos_token": (default_bos_id(tokenizer) is not None, "BOOL"),
    }
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and 0 <= v < n:
            md[f"tokenizer.ggml.{key}_token_id"] = (v, "UINT32")
    tmpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tmpl, str) and tmpl:
        md["tokenizer.chat_template"] = (tmpl, "STRING")
    return md


def tokenizer_metadata_from_gguf(path: str | os.PathLike) -> dict[str, tuple[object, str]]:
    """Every ``tokenizer.*`` key of a GGUF file, with its value type (file validated first)."""
    from lowbit.export.gguf_read import read_metadata

    md, types = read_metadata(path, with_types=True)
    return {k: (v, types[k]) for k, v in md.items() if k.startswith(TOKENIZER_PREFIX)}


def _tokenizer_cache_file(source: dict) -> Path | None:
    sha = source.get("gguf_sha256")
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return None
    from lowbit.models.builtin import cache_root

    return cache_root() / "gguf-tokenizers" / f"{sha}.json"


def _builtin_gguf_tokenizer(source: dict) -> dict | None:
    """Tokenizer metadata of the GGUF a builtin model was converted from.

    Kept as JSON in ``$LOWBIT_CACHE/gguf-tokenizers/<sha256 of the GGUF>.json``; on first need the
    GGUF is fetched again (as on the builtin's first use), checked against the sha256 recorded at
    conversion, and its tokenizer keys stored there. None when it cannot be fetched."""
    import shutil

    from lowbit.models import builtin

    cache = _tokenizer_cache_file(source)
    name = source.get("name")
    if cache is None or name not in builtin.BUILTINS:
        return None
    if cache.is_file():
        try:
            raw = json.loads(cache.read_text(encoding="utf-8"))
            return {k: (v, t) for k, (v, t) in raw.items()}
        except (OSError, ValueError, TypeError):
            pass
    b = builtin.BUILTINS[name]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-gguf-tok-", dir=cache.parent))
    except OSError:
        return None
    try:
        try:
            path, _ = builtin._FETCHERS[name](b, work)
        except LowbitError:
            return None
        if builtin._sha256(Path(path)) != source["gguf_sha256"]:
            return None
        md = tokenizer_metadata_from_gguf(path)
        tmp = work / "tok.json"
        try:
            tmp.write_text(json.dumps({k: [v, t] for k, (v, t) in md.items()}), encoding="utf-8")
            os.replace(tmp, cache)
        except OSError:
            pass  # could not cache it: still use it
        return md
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tokenizer_metadata(m, vocab_size: int) -> tuple[dict, str]:
    """(metadata, where it came from) for the model ``m`` (see the module docstring)."""
    sources = []
    if getattr(m, "record", None):
        sources.append(m.record.get("base_model") or {})
    sources.append(getattr(m, "source", None) or {})
    for src in sources:
        path = src.get("path")
        if src.get("kind") == "gguf" and path and Path(path).is_file():
            return tokenizer_metadata_from_gguf(path), f"copied from {Path(path).name}"
        if src.get("kind") == "builtin":
            md = _builtin_gguf_tokenizer(src)
            if md is not None:
                return md, f"copied from the {src.get('gguf_file', 'source GGUF')}"
    return tokenizer_metadata_from_hf(m.tokenizer, vocab_size), "converted from the HF tokenizer"


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def float_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF parameter name -> float32 tensor; lowbit quantized linears are dequantized. Buffers
    (rotary tables, Gemma's embedding scale) are derived from the config and not written."""
    from lowbit.nn.linear import QuantizedLinear

    out: dict[str, torch.Tensor] = {}
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, QuantizedLinear):
            out[prefix + "weight"] = mod.weight_format.dequantize(dtype=torch.float32)
            if mod.bias is not None:
                out[prefix + "bias"] = mod.bias.detach().float()
            continue
        for pname, p in mod.named_parameters(recurse=False):
            out[prefix + pname] = p.detach().float()
    return out


def _tied(model) -> bool:
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None and hasattr(cfg, "get_text_config"):
        tied = getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    return bool(tied)


def _gguf_layout(name: str, t: torch.Tensor, fam: Family, n_head: int, n_kv: int) -> torch.Tensor:
    """A tensor (float, or integer codes) as the GGUF tensor ``name`` holds it: norm gains with the
    family's offset, q/k rows in GGUF's rotary order."""
    if fam.norm_offset and name.endswith("norm.weight"):  # llama.cpp stores the gain (offset + w)
        t = t + fam.norm_offset
    if fam.gguf.permute_qk and (name.endswith("attn_q.weight") or name.endswith("attn_q.bias")):
        t = permute_qk(t, n_head)
    elif fam.gguf.permute_qk and (name.endswith("attn_k.weight") or name.endswith("attn_k.bias")):
        t = permute_qk(t, n_kv)
    return t


@dataclass(frozen=True)
class TernaryTensor:
    """A BitNet layer as GGUF stores it: codes T int8 [rows, n] in GGUF row order, scale d (β)."""

    codes: torch.Tensor
    scale: float
    bits: float


def ternary_tensors(model) -> dict[str, TernaryTensor]:
    """GGUF name -> codes and scale of every BitNet layer (`lowbit.formats.bitnet.BitNetWeight`)
    of ``model``; LowbitError for one with its own norm (module docstring) or a scale that is not
    float16-exact (the ternary blocks' scale is a float16)."""
    from lowbit.formats.bitnet import BitNetWeight
    from lowbit.nn.linear import QuantizedLinear

    fam = family_of(model)
    cfg = model.config
    n_head = int(cfg.num_attention_heads)
    n_kv = int(_cfg(cfg, "num_key_value_heads", default=n_head))
    tied = _tied(model)
    out: dict[str, TernaryTensor] = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, QuantizedLinear) or not isinstance(mod.weight_format, BitNetWeight):
            continue
        w = mod.weight_format
        if w.norm:
            raise LowbitError(f"cannot export {mname} to GGUF: it is a BitNet layer with its own RMSNorm "
                              f"(norm=True), and llama.cpp's {fam.gguf.name} graph has no norm inside a linear "
                              f"layer; train with norm=False to export")
        hf = f"{mname}.weight"
        if tied and hf == "lm_head.weight":
            continue
        beta = float(w.scale[0])
        if float(torch.tensor(beta).half().float()) != beta:
            raise LowbitError(f"cannot export {mname} to GGUF exactly: its BitNet scale {beta!r} is not a float16 value")
        name = gguf_name(hf, fam)
        out[name] = TernaryTensor(_gguf_layout(name, w.codes(), fam, n_head, n_kv).contiguous(), beta, w.bits)
    return out



@dataclass(frozen=True)
class CarriedTensor:
    """An affine layer's own codes as a legacy GGUF block type holds them (GGUF row order):
    codes [rows, n] (signed c for Q8_0 / Q4_0 / Q5_0, unsigned u for Q4_1 / Q5_1), one float16-exact
    scale d per block of 32 [rows, n / 32], and the blocks' offsets m (Q4_1 / Q5_1) or None."""

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None


def _bits_fit(scheme, gtype: str) -> bool:
    """Whether every code of ``scheme`` is a code of ``gtype`` (the block grid, scales apart)."""
    if gtype in gguf_quants.CODE_RANGES:
        lo, hi = gguf_quants.CODE_RANGES[gtype]
        if scheme.symmetric:
            return lo <= scheme.qmin and scheme.qmax <= hi
        if scheme.zero_point != "int":  # (u - z) · s with a real z is no integer multiple of s
            return False
        span = scheme.qmax - scheme.qmin  # u - z lies in [-span, span]
        return -span >= lo and span <= hi
    if gtype in gguf_quants.OFFSET_TYPES:
        return not scheme.symmetric and scheme.qmax <= gguf_quants.OFFSET_TYPES[gtype]
    return False


def affine_carry(w, gtype: str, layout=lambda t: t) -> CarriedTensor | str:
    """The blocks of GGUF type ``gtype`` that hold the `lowbit.formats.affine.AffineWeight` ``w``
    exactly (its codes and scales unchanged), or why there are none (a one-line reason).

    Symmetric codes c in [qmin, qmax] (and asymmetric ones with an integer zero-point, as c = u - z)
    fit Q8_0 / Q5_0 / Q4_0 when that range lies in the type's (Q8_0: -128..127, Q5_0: -16..15,
    Q4_0: -8..7), with d the group's scale: the block is d * c, which is what ``w.dequantize()``
    computes (one float32 product). A block has one scale, so every lowbit group must be a whole
    number of blocks (group size a multiple of 32, or one scale per row / tensor), and the scales
    must be float16 values. Q4_1 / Q5_1 (d * u + m) take asymmetric codes u with m = -d * z; m
    must be a float16 and d * u + m must give ``w.dequantize()`` bit for bit (checked: it depends
    on the zero-points, and never holds in general for real-valued ones). ``layout`` puts a
    [rows, ...] tensor in GGUF row order (the q/k permutation)."""
    scheme = w.scheme
    block = gguf_quants.BLOCK_LAYOUTS[gtype][0] if gtype in gguf_quants.CODES_EXACT else 0
    if not block:
        return f"{gtype} has no exact form for affine codes"
    if not _bits_fit(scheme, gtype):
        return f"{scheme.short_name()} codes do not lie on {gtype}'s grid"
    rows, n = w.shape
    if n % block:
        return f"rows of {n} are not whole {gtype} blocks"
    if scheme.granularity == "group" and scheme.group_size % block:
        return f"groups of {scheme.group_size} are not whole blocks of {block}"
    s = w.scales.float()
    if not torch.equal(s.half().float(), s):
        return "its scales are not float16 values"
    nb = n // block
    if scheme.granularity == "group":
        idx = torch.arange(nb) * block // scheme.group_size
        d = s[:, idx]
    else:  # one scale per row (channel) or for the whole tensor ([1, 1])
        d = s[:, :1].expand(rows, nb)
    q = w.integers()
    z = w.zero_points()
    zb = None
    if z is not None:
        zb = z[:, idx] if scheme.granularity == "group" else z[:, :1].expand(rows, nb)
    m = None
    if gtype in gguf_quants.CODE_RANGES:
        if zb is not None:
            q = (q.reshape(rows, nb, block) - zb.to(torch.int32)[..., None]).reshape(rows, n)
    else:
        m = -(d * zb.float())
        if not torch.equal(m.half().float(), m):
            return f"its offsets -scale * zero are not float16 values, which {gtype}'s m must be"
    out = CarriedTensor(layout(q).contiguous(), layout(d).contiguous(), None if m is None else layout(m).contiguous())
    if m is not None:  # d * u + m rounds once; lowbit's (u - z) * s as well, but check it bit for bit
        raw = gguf_quants.encode_codes(out.codes.numpy(), out.d.numpy(), gtype, out.m.numpy())
        got = gguf_quants.dequantize(raw, gtype)
        if not np.array_equal(got, layout(w.dequantize()).numpy()):
            return f"d * u + m does not give its values bit for bit in {gtype}"
    return out


def _layers_of(model, fmt_cls) -> dict[str, tuple[str, object]]:
    """GGUF name -> (HF module name, weight) of every linear of ``model`` stored as ``fmt_cls``
    that is written (a tied head is not)."""
    from lowbit.nn.linear import QuantizedLinear

    fam = family_of(model)
    tied = _tied(model)
    out = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, QuantizedLinear) or not isinstance(mod.weight_format, fmt_cls):
            continue
        if tied and mname == "lm_head":
            continue
        out[gguf_name(f"{mname}.weight", fam)] = (mname, mod.weight_format)
    return out


def affine_layers(model) -> dict[str, tuple[str, object]]:
    """GGUF name -> (HF module name, `AffineWeight`) of every affine layer of ``model`` that is
    written (a tied head is not)."""
    from lowbit.formats.affine import AffineWeight

    return _layers_of(model, AffineWeight)


def block_layers(model) -> dict[str, tuple[str, object]]:
    """GGUF name -> (HF module name, `GGUFBlockWeight`) of every layer of ``model`` held as GGUF
    blocks (GPTQ with ``gguf_type``) that is written (a tied head is not)."""
    from lowbit.formats.gguf_blocks import GGUFBlockWeight

    return _layers_of(model, GGUFBlockWeight)


def check_tensor_types(tensor_types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """One-line LowbitError unless every entry of ``tensor_types`` names a tensor of ``shapes``
    (GGUF name -> torch shape) and a type that can hold it: a known type, F32 for a 1-D tensor,
    a row length that is a whole number of the type's blocks."""
    known = PURE_TYPES + ("IQ4_NL",)
    for name, t in tensor_types.items():
        if name not in shapes:
            raise LowbitError(f"tensor_types names {name!r}, which the model does not have (e.g. {next(iter(shapes))})")
        if t not in known:
            raise LowbitError(f"tensor_types: unknown GGUF type {t!r} for {name}; choose one of {', '.join(known)}")
        shape = shapes[name]
        if len(shape) < 2 and t != "F32":
            raise LowbitError(f"tensor_types: {name} is 1-D and is written as F32, not {t}")
        if shape[-1] % _block_size(t):
            raise LowbitError(f"tensor_types: rows of {shape[-1]} in {name} are not whole {t} blocks of {_block_size(t)}")


def tensor_type_patterns(patterns, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """GGUF tensor name -> type from ``patterns`` [(regex, type)] (llama.cpp's ``--tensor-type``):
    each regex is searched in the name of every matrix of ``shapes`` (vectors stay F32), later
    patterns win; a regex that is invalid or matches no matrix is a one-line LowbitError."""
    import re

    names = [n for n, shp in shapes.items() if len(shp) >= 2]
    out: dict[str, str] = {}
    for pat, t in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise LowbitError(f"--tensor-type: {pat!r} is not a regular expression ({e})") from None
        hit = [n for n in names if rx.search(n)]
        if not hit:
            raise LowbitError(f"--tensor-type: {pat!r} matches no weight matrix of this model (e.g. {names[0]})")
        out.update({n: t.upper() for n in hit})
    return out


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """GGUF name -> float32 tensor (torch layout [rows, row length]), q/k permuted, tied head dropped."""
    fam = family_of(model)  # LowbitError for a family lowbit does not know
    cfg = model.config
    n_head = int(cfg.num_attention_heads)
    n_kv = int(_cfg(cfg, "num_key_value_heads", default=n_head))
    sd = float_state_dict(model)
    if _tied(model):
        sd.pop("lm_head.weight", None)
    out: dict[str, torch.Tensor] = {}
    for hf, t in sd.items():
        if hf.endswith("rotary_emb.inv_freq") or ".rotary_emb." in hf:
            continue
        name = gguf_name(hf, fam)
        t = _gguf_layout(name, t, fam, n_head, n_kv)
        if not bool(torch.isfinite(t).all()):
            raise LowbitError(f"tensor {hf} has NaN/Inf values; refusing to export it")
        out[name] = t.contiguous()
    if "token_embd.weight" not in out:
        raise LowbitError(f"the model has no token embedding ({fam.embed}.weight)")
    # llama.cpp's order: token_embd, then per block, then the head (order only matters for readers)
    def key(n):
        i = _block_index(n)
        return (0 if n == "token_embd.weight" else 1 if i is not None else 2, i or 0, n)

    return {n: out[n] for n in sorted(out, key=key)}


# --------------------------------------------------------------------------------------------
# the writer
# --------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    path: str
    qtype: str
    arch: str
    n_tensors: int
    types: dict[str, int]  # GGUF type -> number of tensors
    tensor_types: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    tokenizer: str = ""
    imatrix: bool = False
    seconds: float = 0.0
    ternary: dict[str, str] = field(default_factory=dict)  # BitNet layers written exactly: name -> type
    carried: dict[str, str] = field(default_factory=dict)  # affine / GGUF-block layers written with their codes: name -> type
    requantized: dict[str, str] = field(default_factory=dict)  # affine / GGUF-block layers re-quantized: name -> why


def encode_tensor(x: np.ndarray, t: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, n] -> the array GGUFWriter stores for type ``t`` (float32 for F32, else bytes)."""
    if t == "F32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if imatrix is not None and t in QUANTIZED | {"IQ4_NL"}:
        from lowbit.export import gguf_imatrix

        if gguf_imatrix.supports(t):
            return gguf_imatrix.quantize(x, t, imatrix)
    if t == "IQ4_NL":
        from lowbit.export import gguf_imatrix

        return gguf_imatrix.quantize(x, t, None)
    return gguf_quants.quantize(x, t)


def _writer_class():
    """gguf.GGUFWriter that can also write an empty typed array (a tokenizer without merges)."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return bytes(head + self._pack("I", sub_type) + self._pack("Q", 0))
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return Writer


def _add_kv(writer, key: str, value, vtype: str) -> None:
    from gguf import GGUFValueType

    if vtype.startswith("ARRAY"):
        sub = vtype.split(":", 1)[1] if ":" in vtype else None
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY,
                             sub_type=GGUFValueType[sub] if sub and sub != "ARRAY" else None)
    else:
        writer.add_key_value(key, value, GGUFValueType[vtype])


def _input_paths(m) -> list[str]:
    """The files and folders the model was read from (never to be overwritten by its export)."""
    src = getattr(m, "source", None) or {}
    paths = [src.get("path"), getattr(m, "path", None)]
    base = (getattr(m, "record", None) or {}).get("base_model") or {}
    paths.append(base.get("path"))
    return [p for p in paths if isinstance(p, str) and p]


def export_gguf(m, out_path: str | os.PathLike, qtype: str = "Q8_0", *, imatrix: dict | None = None,
                name: str | None = None, progress=None, force: bool = False,
                tensor_types: dict[str, str] | None = None,
                tensor_patterns: list[tuple[str, str]] | None = None) -> ExportReport:
    """Write ``m`` (a lowbit Model: float or lowbit-quantized) to ``out_path`` as GGUF ``qtype``.
    ``tensor_types`` (GGUF tensor name -> type) overrides the type `choose_types` gives those
    tensors (checked by `check_tensor_types`); a layer held as GGUF blocks is written as its own
    type unless ``tensor_types`` names another; ``tensor_patterns`` [(regex, type)] name tensors by
    regular expression (`tensor_type_patterns`). An existing file is replaced only if it is a GGUF
    file, not the model's own input and not inside a checkpoint (`lowbit.outputs.check_file`;
    ``force`` overrides)."""
    import gguf

    t0 = time.perf_counter()
    if qtype not in EXPORT_TYPES:
        raise LowbitError(f"unknown GGUF export type {qtype!r}; choose one of {', '.join(EXPORT_TYPES)}")
    out_path = outputs.check_file(out_path, b"GGUF", force=force, inputs=_input_paths(m))
    model = m.model
    ternary = ternary_tensors(model)  # first: refuses what GGUF cannot hold before any work
    tensors = gguf_tensors(model)
    fam = family_of(model)
    arch = fam.gguf.name
    cfg = model.config
    n_layer = int(cfg.num_hidden_layers)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if tensor_patterns:  # regex -> type, resolved on this model's names (exact names below win)
        tensor_types = {**tensor_type_patterns(tensor_patterns, shapes), **(tensor_types or {})}
    if tensor_types:
        check_tensor_types(tensor_types, shapes)
    types = choose_types(shapes, qtype, n_layer, set(ternary))
    blocks = block_layers(model)
    for gname, (_, bw) in blocks.items():  # GGUF blocks are written as they are
        types[gname] = bw.gguf_type
    types.update(tensor_types or {})
    n_head = int(cfg.num_attention_heads)
    n_kv = int(_cfg(cfg, "num_key_value_heads", default=n_head))
    affine = affine_layers(model)
    carried: dict[str, str] = {}
    requantized: dict[str, str] = {}
    vocab = int(tensors["token_embd.weight"].shape[0])
    tok_md, tok_from = tokenizer_metadata(m, vocab)
    if imatrix is not None:
        for k, v in imatrix.items():
            if k in tensors and tensors[k].dim() == 2 and np.asarray(v).shape != (tensors[k].shape[1],):
                raise LowbitError(f"importance matrix for {k} has {np.asarray(v).size} values, expected {tensors[k].shape[1]}")

    with outputs.atomic_file(out_path) as tmp:
        w = _writer_class()(str(tmp), arch)
        w.add_name(name or getattr(m, "name", None) or "model")
        # a BitNet checkpoint's linears are mostly ternary: its file type says so
        w.add_file_type(FILE_TYPES[ternary_type(qtype)] if ternary else FILE_TYPES.get(qtype, 1))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(VERSION_KEY, __version__)  # says the file carries DIGEST_KEY (models.gguf_check)
        for k, (v, vt) in architecture_metadata(cfg, fam).items():
            _add_kv(w, k, v, vt)
        for k, (v, vt) in tok_md.items():
            _add_kv(w, k, v, vt)
        w.add_string("general.quantized_by", "lowbit")
        w.add_string(DIGEST_KEY, PLACEHOLDER.decode())  # stamped below, once the file is complete
        for i, (gname, t) in enumerate(tensors.items()):
            gt = types[gname]
            x = t.numpy()
            if x.ndim == 1:
                x = x[None, :]
            imat = None if imatrix is None else imatrix.get(gname)
            if imat is None and imatrix is not None and gname == "token_embd.weight" and "output.weight" not in tensors:
                imat = imatrix.get("output.weight")  # tied: the embedding plays the output's role
            if imat is not None:
                imat = np.asarray(imat, dtype=np.float32)
            tt = ternary.get(gname)
            ct = None
            raw = None
            if gname in blocks:
                bw = blocks[gname][1]
                if gt == bw.gguf_type:
                    raw = _gguf_layout(gname, bw.raw.cpu(), fam, n_head, n_kv).contiguous().numpy()  # rows are independent
                    carried[gname] = gt
                else:
                    requantized[gname] = f"{gt}: its blocks are {bw.gguf_type}"
            if gname in affine:
                ct = affine_carry(affine[gname][1], gt, lambda v, n=gname: _gguf_layout(n, v, fam, n_head, n_kv))
                if isinstance(ct, str):
                    requantized[gname] = f"{gt}: {ct}"
                    ct = None
                else:
                    carried[gname] = gt
            if raw is not None:
                data = raw
            elif tt is not None and gt in gguf_quants.TERNARY_EXACT:
                data = gguf_quants.encode_ternary(tt.codes.numpy(), tt.scale, gt)
            elif ct is not None:
                data = gguf_quants.encode_codes(ct.codes.numpy(), ct.d.numpy(), gt,
                                                None if ct.m is None else ct.m.numpy())
            else:
                data = encode_tensor(x, gt, None if tt is not None else imat)  # F16 holds ±β exactly
            if t.dim() == 1:
                data = data.reshape(-1)
                w.add_tensor(gname, data, raw_dtype=None if gt == "F32" else gguf.GGMLQuantizationType[gt])
            else:
                w.add_tensor(gname, data, raw_dtype=None if gt == "F32" else gguf.GGMLQuantizationType[gt])
            if progress:
                progress(i + 1, len(tensors), gname, gt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        stamp_digest(tmp)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return ExportReport(path=str(out_path), qtype=qtype, arch=arch, n_tensors=len(tensors),
                        types=dict(sorted(counts.items())), tensor_types=types, bytes=out_path.stat().st_size,
                        tokenizer=tok_from, imatrix=imatrix is not None, seconds=time.perf_counter() - t0,
                        ternary={k: types[k] for k in ternary}, carried=carried, requantized=requantized)


# --------------------------------------------------------------------------------------------
# importance matrix
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_imatrix(m, n_samples: int = 16, seq_len: int = 512, text: str | None = None, seed: int = 0,
                    batch_size: int = 4) -> dict[str, np.ndarray]:
    """Per-input-column mean of x² for every linear layer's input over calibration windows,
    keyed by GGUF tensor name (llama.cpp's imatrix: sum of x² over tokens / number of tokens).

    Calibration text: lowbit's bundled calibration split (``lowbit.data.texts``) unless ``text``."""
    from lowbit.calibration.inputs import input_square_sums
    from lowbit.data.texts import calibration_samples
    from lowbit.nn.linear import QuantizedLinear

    model = m.model
    fam = family_of(model)
    samples = calibration_samples(m.tokenizer, n_samples=n_samples, seq_len=seq_len, text=text, seed=seed)
    layers = {}
    for mname, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.Linear, QuantizedLinear)):
            continue
        try:
            layers[gguf_name(mname + ".weight", fam)] = mod
        except LowbitError:
            continue
    sums, counts = input_square_sums(model, layers, samples, batch_size)
    return {k: (sums[k] / counts[k]).float().numpy() for k in sums}
