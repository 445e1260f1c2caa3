"""Export a lowbit-quantized model in the compressed-tensors layout (transformers, vLLM).

    from lowbit import api
    from lowbit.export.compressed_tensors import export_compressed_tensors
    m = api.load()
    api.quantize(m, "gptq", QuantScheme(bits=4, symmetric=False, group_size=128))
    export_compressed_tensors(m, "out/smollm2-w4a16")
    # transformers (with the compressed-tensors package): AutoModelForCausalLM.from_pretrained(...)

The directory holds ``config.json`` (the model config plus a ``quantization_config``), one
``model.safetensors``, the tokenizer files, ``generation_config.json`` and ``lowbit_export.json``
(how the model was made; a loader ignores it). It is assembled under a temporary name beside the
target and renamed into place when complete, as lowbit's own checkpoints are.

On-disk layout (the "pack-quantized" and "int-quantized" formats of compressed-tensors 0.20)
---------------------------------------------------------------------------------------------
compressed-tensors thinks in *signed* integers q in [-2^(b-1), 2^(b-1) - 1] for symmetric and
asymmetric grids alike, with W = (q - zp) * scale (zp = 0 when symmetric). lowbit stores unsigned
codes u (symmetric: u = q + 2^(b-1); asymmetric: u in [0, 2^b - 1] with an unsigned zero-point z,
W = (u - z) * scale). The two agree with q = u - 2^(b-1) and zp = z - 2^(b-1), and the packed
form of compressed-tensors stores q + 2^(b-1) = u: the packed bits are lowbit's codes unchanged.

``pack-quantized`` (weight-only, WbA16), per quantized linear layer ``<name>``:

* ``<name>.weight_packed``  int32 [out, ceil(in*b/32)] — each row is a dense little-endian bit
  stream of its unsigned codes: code i occupies stream bits [i*b, (i+1)*b), word k holds stream
  bits [32k, 32k+32) (bit 0 = least significant). Codes may straddle words (b = 3, 5, 6, 7);
  for b = 4 and 8 this is the familiar 8 (4) codes per word, first code in the low bits.
  lowbit's own packing (``lowbit.core.packing``) is the same stream in bytes, so a row of
  ``AffineWeight.qweight`` is re-read as little-endian 32-bit words (tail zero-padded/trimmed).
* ``<name>.weight_scale``   [out, n_groups] (group), [out, 1] (channel), [1] (tensor), in the
  model's dtype, as compressed-tensors writes them (loaders dequantize in the scales' dtype).
  lowbit's float16 scales become float32 or float16 exactly; ``dtype="bfloat16"`` rounds them.
* ``<name>.weight_zero_point`` (asymmetric only) int32 [ceil(out*b/32), n_groups]: the unsigned
  zero-points z packed like the codes but along the *output* dimension (each column of the
  [out, n_groups] matrix is one bit stream). Per-tensor: int8 [1] holding z - 2^(b-1), unpacked.
* ``<name>.weight_shape``   int64 [2] = (out, in).

``int-quantized`` (W8A8: int8 weights per output channel, int8 activations quantized per token at
run time): ``<name>.weight`` int8 [out, in] holding q, ``<name>.weight_scale`` [out, 1]. lowbit's
``dynamic-int8`` format maps here as it is (its per-tensor activation option becomes a dynamic
"tensor" strategy); 8-bit symmetric per-channel affine weights map here with
``activations="int8-dynamic"``. Run-time activation rounding is the loader's: vLLM's int8 kernels
use amax/127 per token like lowbit's; transformers' emulation uses amax/127.5 with [-128, 127].
The weights load exactly; the logits differ by the activation rounding: 0.6% relative on a tiny
random model, ~9% on SmolLM2, whose outlier activations amplify any rounding difference through
the layers (a 1e-7 relative change of its embeddings moves lowbit's own int8 logits as much).

Loading with transformers (+ compressed-tensors 0.20): symmetric exports load as is and are
decompressed on the first forward pass; asymmetric ones need
``from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True))``, because
compressed-tensors 0.20 prepares the empty model with *unpacked* zero-points and then rejects the
packed ones (which vLLM and compressed-tensors' own decompressor expect). ``dequantize=True``
makes the model dense, activation quantization included (W8A8 then runs as W8A16).

Groups: compressed-tensors needs group_size to divide the input width, while lowbit allows a
shorter last group (SmolLM2's 576-wide rows at group 128 end in a 64-wide group). The layers of
one lowbit scheme are then exported *exactly* at group size g = gcd(group_size, their input
widths) (SmolLM2 at 128: 64): each lowbit group becomes group_size / g exported groups sharing
its scale and zero-point (more scales on disk, the same weights), and the model keeps a single
config group. vLLM's kernels take group sizes 32/64/128 and channel; transformers takes any.

Not representable, refused with a one-line error: float zero-points (HQQ's default grid,
``zero_point="float"``: compressed-tensors zero-points are integers; quantize with integer
zero-points instead), NF4 codebooks, and LLM.int8()'s outlier decomposition.

Bit widths: every b from 2 to 8 is written in the layout above (checked against
compressed-tensors 0.20's packer); vLLM runs b = 4 and 8 only. For b = 3, 5, 6, 7 older
compressed-tensors releases may expect a different (non-straddling) packing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lowbit.version import __version__
from lowbit.core import packing
from lowbit.errors import LowbitError

LAYOUT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes (config "version")
EXPORT_RECORD = "lowbit_export.json"
WEIGHTS = "model.safetensors"
PACKED_FORMAT = "pack-quantized"
INT8_FORMAT = "int-quantized"
ACTIVATIONS = (None, "int8-dynamic")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# 32-bit word packing
# ---------------------------------------------------------------------------------------------

def packed_words(n: int, bits: int) -> int:
    """32-bit words one packed row of n b-bit codes takes."""
    return math.ceil(n * bits / 32)


def _stream_to_words(stream: Tensor, n_words: int) -> Tensor:
    """uint8 [rows, nbytes] little-endian bit stream -> int32 [rows, n_words] (two's complement)."""
    rows, nbytes = stream.shape
    want = 4 * n_words
    if nbytes < want:
        stream = torch.nn.functional.pad(stream, (0, want - nbytes))
    elif nbytes > want:
        if stream[:, want:].any():
            raise LowbitError("packed stream has set bits beyond its last code")  # never for valid codes
        stream = stream[:, :want]
    b = stream.reshape(rows, n_words, 4).to(torch.int64)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _words_to_stream(words: Tensor, nbytes: int) -> Tensor:
    """int32 [rows, n_words] -> uint8 [rows, nbytes] little-endian bit stream (zero-padded/trimmed)."""
    rows, n_words = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(4, dtype=torch.int64) * 8
    stream = ((w.unsqueeze(-1) >> shifts) & 0xFF).reshape(rows, 4 * n_words).to(torch.uint8)
    if stream.shape[1] < nbytes:
        stream = torch.nn.functional.pad(stream, (0, nbytes - stream.shape[1]))
    return stream[:, :nbytes].contiguous()


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes [rows, n] (each < 2**bits) -> int32 [rows, ceil(n*bits/32)], row-wise dense
    little-endian bit streams (see the module docstring)."""
    if codes.dim() != 2:
        raise LowbitError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    return _stream_to_words(packing.pack(codes, bits), packed_words(codes.shape[1], bits))


def unpack_int32(words: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_int32`: int32 [rows, ceil(n*bits/32)] -> unsigned codes int32 [rows, n]."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise LowbitError(f"expected 2-D int32 packed words, got {tuple(words.shape)}/{words.dtype}")
    if words.shape[1] != packed_words(n, bits):
        raise LowbitError(f"packed row has {words.shape[1]} words, expected {packed_words(n, bits)} "
                          f"for {n} {bits}-bit values")
    return packing.unpack(_words_to_stream(words, packing.packed_row_bytes(n, bits)), bits, n)


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------

def _weight_args(bits: int, symmetric: bool, strategy: str, group_size: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "dynamic": False, "actorder": None}


def _int8_dynamic_args(strategy: str = "token") -> dict:
    """int8 activations, symmetric, scale chosen at run time per token (or per tensor)."""
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": strategy,
            "dynamic": True, "actorder": None}


def export_group_size(group_size: int, widths) -> int:
    """The largest group size that divides every input width and ``group_size``: a lowbit group
    (possibly a shorter last one) is then a whole number of exported groups."""
    g = group_size
    for c in widths:
        g = math.gcd(g, int(c))
    return g


def convert_affine(w, name: str = "weight", *, activations: str | None = None,
                   group_size: int | None = None) -> tuple[dict, dict, str]:
    """One `AffineWeight` -> (tensors with local names, scheme dict, format name).

    ``group_size``: the exported group size for a grouped scheme (default gcd(scheme's group
    size, input width)); it must divide both. ``activations="int8-dynamic"`` writes W8A8 (needs
    8-bit symmetric per-channel or per-tensor weights); otherwise weight-only pack-quantized."""
    sch = w.scheme
    rows, cols = w.shape
    b = sch.bits
    if sch.zero_point == "float" and not sch.symmetric:
        raise LowbitError(f"{name}: float zero-points ({sch.short_name()}, HQQ-style) cannot be stored in "
                          "compressed-tensors, whose zero-points are integers; quantize with integer zero-points")
    if sch.granularity == "group":
        g = group_size or export_group_size(int(sch.group_size), [cols])
        if int(sch.group_size) % g or cols % g:
            raise LowbitError(f"{name}: export group size {g} must divide group size {sch.group_size} and width {cols}")
        idx = torch.arange(cols // g) * g // int(sch.group_size)  # lowbit group of each exported group
        strategy, group_size = "group", g
    else:
        idx = None
        strategy, group_size = sch.granularity, None  # "channel" or "tensor"
    scales = w.scales if idx is None else w.scales[:, idx]
    if strategy == "tensor":
        scales = scales.reshape(1)
    scales = scales.contiguous()

    if activations == "int8-dynamic":
        if b != 8 or not sch.symmetric or strategy == "group":
            raise LowbitError(f"{name}: W8A8 export needs 8-bit symmetric per-channel weights, got {sch.short_name()}")
        q = w.integers().to(torch.int8)
        scheme = {"weights": _weight_args(8, True, strategy, None), "input_activations": _int8_dynamic_args()}
        return {"weight": q.contiguous(), "weight_scale": scales}, scheme, INT8_FORMAT
    if activations is not None:
        raise LowbitError(f"unknown activation quantization {activations!r}; choose int8-dynamic or none")

    tensors = {
        "weight_packed": _stream_to_words(w.qweight, packed_words(cols, b)),
        "weight_scale": scales,
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not sch.symmetric:
        z = w.zero_points()  # int32 [rows, n_groups] (per-tensor [1, 1]), unsigned
        if strategy == "tensor":
            tensors["weight_zero_point"] = (z.reshape(1) - 2 ** (b - 1)).to(torch.int8)
        else:
            if idx is not None:
                z = z[:, idx]
            tensors["weight_zero_point"] = pack_int32(z.t().contiguous(), b).t().contiguous()
    scheme = {"weights": _weight_args(b, sch.symmetric, strategy, group_size), "input_activations": None}
    return tensors, scheme, PACKED_FORMAT


def _convert_module(mod, name: str, activations: str | None, group_size: int | None) -> tuple[dict, dict, str]:
    fmt = mod.weight_format
    kind = type(fmt).name
    if kind == "affine":
        return convert_affine(fmt, name, activations=activations, group_size=group_size)
    if kind == "dynamic-int8":  # W8A8 by construction: int8 codes per channel, activations per token/tensor
        rows = fmt.shape[0]
        scheme = {"weights": _weight_args(8, True, "channel", None),
                  "input_activations": _int8_dynamic_args(fmt.activations)}
        return {"weight": fmt.qweight, "weight_scale": fmt.wscale.reshape(rows, 1)}, scheme, INT8_FORMAT
    if kind == "llm-int8":
        raise LowbitError(f"{name}: LLM.int8() weights (outlier decomposition) have no compressed-tensors form; "
                          "export rtn int8 per-channel instead")
    raise LowbitError(f"{name}: weight format {kind!r} has no compressed-tensors form (affine integer grids only)")


def dequantize_tensors(tensors: dict[str, Tensor], scheme: dict) -> Tensor:
    """Float32 weight from one layer's exported tensors (local names) and its config-group scheme,
    written from the layout in the module docstring; used to check exports."""
    wa = scheme["weights"]
    b, strategy = int(wa["num_bits"]), wa["strategy"]
    if "weight_packed" in tensors:
        rows, cols = (int(v) for v in tensors["weight_shape"])
        q = unpack_int32(tensors["weight_packed"], b, cols) - 2 ** (b - 1)
    else:
        q = tensors["weight"].to(torch.int32)
        rows, cols = q.shape
    s = tensors["weight_scale"].float()
    zp = None
    if not wa["symmetric"]:
        zpt = tensors["weight_zero_point"]
        if strategy == "tensor":
            zp = zpt.to(torch.int32).reshape(1, 1)
        else:
            n_groups = s.shape[1]
            zp = unpack_int32(zpt.t().contiguous(), b, rows).t() - 2 ** (b - 1)  # [rows, n_groups]
            assert zp.shape == (rows, n_groups)
    qf = q.float()
    if zp is not None and strategy != "group":
        qf = qf - zp.float()
    if strategy == "group":
        g = int(wa["group_size"])
        qg = qf.reshape(rows, cols // g, g)
        if zp is not None:
            qg = qg - zp.float().unsqueeze(-1)
        return (qg * s.unsqueeze(-1)).reshape(rows, cols)
    if strategy == "channel":
        return qf * s.reshape(rows, 1)
    return qf * s.reshape(())


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------

def _targets(group_names: list[str], all_quantized: dict[str, str], other_linears: list[str]) -> list[str]:
    """Targets for one config group: leaf-name regexes when every module with those leaf names
    belongs to this group (and no unquantized linear shares them), else the exact module names."""
    leaves = sorted({n.rpartition(".")[2] for n in group_names})
    clean = all(all_quantized[n] == all_quantized[group_names[0]]
                for n in all_quantized if n.rpartition(".")[2] in leaves)
    clean = clean and not any(n.rpartition(".")[2] in leaves for n in other_linears)
    if clean:
        return [f"re:(.*\\.)?{re.escape(leaf)}$" for leaf in leaves]
    return sorted(group_names)


def quantization_config(module_schemes: dict[str, tuple[dict, str]], other_linears: list[str]) -> dict:
    """The ``quantization_config`` of config.json: one config group per distinct (scheme, format);
    targets ``Linear`` when there is only one, unquantized linear layers listed in ``ignore``."""
    keys: dict[str, str] = {}
    groups: dict[str, dict] = {}
    members: dict[str, list[str]] = {}
    for name, (scheme, fmt) in module_schemes.items():
        key = json.dumps([scheme, fmt], sort_keys=True)
        keys[name] = key
        if key not in groups:
            groups[key] = {**scheme, "output_activations": None, "format": fmt}
            members[key] = []
        members[key].append(name)
    config_groups = {}
    for i, (key, g) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else _targets(members[key], keys, other_linears)
        config_groups[f"group_{i}"] = {"targets": targets, **g}
    formats = {g["format"] for g in groups.values()}
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(other_linears),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }


# ---------------------------------------------------------------------------------------------
# the export
# ---------------------------------------------------------------------------------------------

def _unwrap(model, tokenizer, record):
    """Accept a lowbit ``api.Model`` (its tokenizer and record are used) or a bare module."""
    if isinstance(model, nn.Module):
        return model, tokenizer, record
    inner = getattr(model, "model", None)
    if not isinstance(inner, nn.Module):
        raise LowbitError(f"expected a lowbit model or a torch module, got {type(model).__name__}")
    return inner, tokenizer if tokenizer is not None else getattr(model, "tokenizer", None), \
        record if record is not None else getattr(model, "record", None)


def export_compressed_tensors(model, out_dir: str | os.PathLike, *, tokenizer=None, record: dict | None = None,
                              dtype: str | None = None, activations: str | None = None, force: bool = False) -> Path:
    """Write ``model`` (a lowbit ``api.Model`` or a module holding ``QuantizedLinear`` layers) as a
    compressed-tensors checkpoint directory ``out_dir``; return its path.

    dtype:        dtype of the tensors lowbit keeps in float (embeddings, norms, biases, unquantized
                  linears), of the quantization scales and the config's ``dtype``; None keeps the
                  model's (float32 for a model lowbit loaded: the export then dequantizes to
                  exactly lowbit's weights). "float16" suits vLLM; "bfloat16" rounds the scales.
    activations:  None (weight-only, pack-quantized) or "int8-dynamic" (W8A8: int8 weights per
                  channel, int8 activations quantized per token at run time by the loader).

    Refuses to replace a directory that is not an earlier export or holds other files
    (`lowbit.outputs.check_dir`; ``force`` overrides).
    """
    from lowbit import checkpoint

    module, tokenizer, record = _unwrap(model, tokenizer, record)
    if activations not in ACTIVATIONS:
        raise LowbitError(f"unknown activation quantization {activations!r}; choose int8-dynamic or none")
    if dtype is not None and dtype not in _DTYPES:
        raise LowbitError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    qmods = checkpoint.quantized_modules(module)
    if not qmods:
        raise LowbitError("model has no quantized layers; quantize it before exporting")
    config = getattr(module, "config", None)
    if config is None:
        raise LowbitError("model has no transformers config; only transformers causal LMs can be exported")

    # The dtype of everything kept in float: asked for, or what the model's own float tensors use.
    prefixes = tuple(n + "." for n in qmods)
    state = checkpoint._unique_state_dict(module)
    if dtype is not None:
        dense = _DTYPES[dtype]
    else:
        kept = {t.dtype for k, t in state.items() if t.is_floating_point() and not k.startswith(prefixes)}
        dense = kept.pop() if len(kept) == 1 else torch.float32

    tensors: dict[str, Tensor] = {}
    schemes: dict[str, tuple[dict, str]] = {}
    # One exported group size per lowbit scheme (gcd over the layers' widths), so that a model
    # quantized with one scheme gets one config group (transformers' load-time dequantization
    # uses a single scheme for all dense layers).
    widths: dict[str, list[int]] = {}
    for mod in qmods.values():
        sch = getattr(mod.weight_format, "scheme", None)
        if sch is not None and sch.granularity == "group":
            widths.setdefault(json.dumps(sch.to_dict(), sort_keys=True), []).append(mod.in_features)
    for name, mod in qmods.items():
        sch = getattr(mod.weight_format, "scheme", None)
        g = None
        if sch is not None and sch.granularity == "group":
            g = export_group_size(int(sch.group_size), widths[json.dumps(sch.to_dict(), sort_keys=True)])
        local, scheme, fmt = _convert_module(mod, name, activations, g)
        schemes[name] = (scheme, fmt)
        # Scales in the model dtype, as loaders expect: transformers dequantizes in the scales'
        # dtype, so float16 scales in a float32 model would round every weight to float16.
        local["weight_scale"] = local["weight_scale"].to(dense)
        for k, t in local.items():
            tensors[f"{name}.{k}"] = t.detach().to("cpu").contiguous()
    for k, t in state.items():
        if k.startswith(prefixes) and not k.endswith(".bias"):
            continue  # the packed buffers, replaced above
        tensors[k] = t.to(dense) if t.is_floating_point() else t
    other_linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config(schemes, other_linears)

    cfg = copy.deepcopy(config)
    for attr in ("quantization_config",):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                setattr(cfg, attr, None)
    cfg.dtype = dense
    out_emb = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if out_emb is not None and any(m is out_emb for m in qmods.values()):
        cfg.tie_word_embeddings = False  # a quantized lm_head no longer shares the embedding

    rec = {"layout": f"compressed-tensors {LAYOUT_VERSION}", "activations": activations,
           "dtype": str(dense).removeprefix("torch."), "record": record,
           "modules": {n: m.meta() for n, m in qmods.items()}}
    return write_export(out_dir, cfg, qconfig, module, tokenizer, tensors, rec, force=force)


def write_export(out_dir, cfg, qconfig: dict, module, tokenizer, tensors: dict[str, Tensor], rec: dict, *,
                 force: bool = False) -> Path:
    """An export folder transformers loads: ``config.json`` (``cfg`` with ``quantization_config``),
    the generation config and tokenizer, ``tensors`` in one safetensors file, and lowbit's record
    ``rec`` (with lowbit's version) in ``lowbit_export.json``; checked (`outputs.check_dir`) and
    written atomically (`outputs.atomic_dir`). Every export layout (compressed-tensors, AQLM)
    writes through here."""
    from safetensors.torch import save_file

    from lowbit import outputs

    out = outputs.check_dir(out_dir, EXPORT_RECORD, force=force)
    with outputs.atomic_dir(out) as tmp:
        cfg.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        data = json.loads(cfg_file.read_text())
        data["quantization_config"] = qconfig
        cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        gen = getattr(module, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "lowbit_version": __version__})
        (tmp / EXPORT_RECORD).write_text(json.dumps({"lowbit_version": __version__, **rec}, indent=2,
                                                    default=str) + "\n")
    return out


def read_export(path: str | os.PathLike) -> dict[str, Tensor]:
    """Dequantized float32 weights {module name: W} of every quantized layer of an export."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise LowbitError(f"{path} is not a compressed-tensors export: {e}") from None
    rec = json.loads((path / EXPORT_RECORD).read_text()) if (path / EXPORT_RECORD).is_file() else None
    tensors = load_file(str(path / WEIGHTS))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight_scale")})
    out = {}
    for name in names:
        scheme = _scheme_for(name, qc, rec)
        local = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
        out[name] = dequantize_tensors(local, scheme)
    return out


def _scheme_for(name: str, qc: dict, rec: dict | None) -> dict:
    leaf = name.rpartition(".")[2]
    for g in qc["config_groups"].values():
        for t in g["targets"]:
            if t == name or (t == "Linear") or (t.startswith("re:") and re.match(t[3:], name)):
                return g
    raise LowbitError(f"no config group of the export targets {name} ({leaf})")
