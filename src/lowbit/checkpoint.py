"""Saving and loading quantized models: safetensors + a JSON record, written atomically.

A checkpoint directory holds

* ``model.safetensors`` — every tensor: float parameters of the untouched modules, the packed
  tensors of each quantized module (``<layer>.qweight``, ``<layer>.scales``, ...). Tied tensors
  (e.g. lm_head = embed_tokens) are stored once. A checkpoint larger than ``max_shard_size``
  is split as Hugging Face does: ``model-00001-of-0000n.safetensors`` ... plus
  ``model.safetensors.index.json`` (``ShardWriter``, which also serves the streaming quantizer
  that writes block by block).
* ``config.json`` and the tokenizer files — the Hugging Face model skeleton.
* ``lowbit.json`` — how the model was made: lowbit version, method and its settings (scheme),
  the base model, the calibration data used, and each quantized module's format and shape.

The directory is assembled under a temporary name beside the target and swapped into place only
when complete (``lowbit.json`` last, everything fsync'ed), so a crash never leaves a directory
that looks like a finished checkpoint; what may be replaced, and how, is `lowbit.outputs`'s.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit import outputs
from lowbit.version import __version__
from lowbit.errors import LowbitError
from lowbit.integrations import hf_config
from lowbit.core.grid import all_finite
from lowbit.models.loading import LOWBIT_CHECKPOINT_MARKER as RECORD
from lowbit.models.loading import is_lowbit_checkpoint as is_checkpoint  # noqa: F401 (re-exported)
from lowbit.nn import module_from_meta
from lowbit.nn.embedding import QuantizedEmbedding
from lowbit.nn.linear import QuantizedLinear

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = 5 * 10**9


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module whose stored tensors are a packed format (QuantizedLinear, QuantizedEmbedding)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage (tied weights) kept once, contiguous, on CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().to("cpu").contiguous()
    return out


def write_skeleton(tmp: Path, model: nn.Module, tokenizer, record: dict) -> None:
    """config.json (and the tokenizer files) of a checkpoint being assembled in ``tmp``."""
    model.config.save_pretrained(tmp)
    hf_config.add_to_config_json(tmp / "config.json", record)  # transformers loads it via lowbit
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def write_record(tmp: Path, model: nn.Module, record: dict) -> None:
    """``lowbit.json``: the run's record plus each quantized module's format (written last)."""
    full = dict(record)
    full["lowbit_version"] = __version__
    full["modules"] = {n: m.meta() for n, m in quantized_modules(model).items()}
    # a quantized output layer or embedding (api.quantize(head=..., embed=...)) is no longer tied
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    full["tied_word_embeddings"] = (bool(getattr(model.config, "tie_word_embeddings", False))
                                    and not isinstance(head, QuantizedLinear)
                                    and not isinstance(emb, QuantizedEmbedding))
    full["files"] = file_digests(tmp)
    (tmp / RECORD).write_text(json.dumps(full, indent=2, default=str) + "\n")


# -- integrity: every file's sha256 in the record, checked on load ----------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_digests(folder: Path) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file of a checkpoint being written (the record excepted)."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECORD}


def verify_files(path: str | os.PathLike, rec: dict) -> None:
    """Each file the record lists is there with its recorded size and sha256 (a flipped byte is
    an error naming the file). Records written before lowbit kept digests list none: nothing to
    check. Off when `lowbit.models.files.VERIFY_FILES` is False."""
    files = rec.get("files")
    from lowbit.models import files as _files

    if not _files.VERIFY_FILES or files is None:
        return
    path = Path(path)
    if not isinstance(files, dict):
        raise LowbitError(f"{path / RECORD}: 'files' must map file names to their sizes and digests")
    for name, want in files.items():
        if not isinstance(want, dict) or not isinstance(want.get("sha256"), str) or "/" in name or name in ("", ".", ".."):
            raise LowbitError(f"{path / RECORD}: a bad entry for file {name!r} in 'files'")
        f = path / name
        if not f.is_file():
            raise LowbitError(f"checkpoint {path} lacks {name}, which its record lists")
        if f.stat().st_size != want.get("bytes"):
            raise LowbitError(f"{f} is corrupt: {f.stat().st_size} bytes, {want.get('bytes')} when it was saved "
                              "(re-create it, or --no-verify to load it anyway)")
        if _sha256(f) != want["sha256"]:
            raise LowbitError(f"{f} is corrupt: its sha256 differs from the one recorded when it was saved "
                              "(re-create it, or --no-verify to load it anyway)")


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, record: dict, *,
         max_shard_size: int = DEFAULT_MAX_SHARD, keep_dtype: dict[str, torch.dtype] | None = None,
         force: bool = False) -> Path:
    """Write a checkpoint atomically. Refuses to replace a directory that is not a lowbit
    checkpoint or holds other files (`lowbit.outputs.check_dir`; ``force`` overrides), so a typo
    never destroys unrelated files. One ``model.safetensors``
    unless the tensors exceed ``max_shard_size`` bytes (then shards + index). ``keep_dtype``
    stores the named float tensors in the given dtype (the source's, for an unquantized
    embedding or head of a bf16/fp16 model)."""
    out = outputs.check_dir(out_dir, RECORD, force=force)
    with outputs.atomic_dir(out) as tmp:
        write_skeleton(tmp, model, tokenizer, record)
        tensors = _unique_state_dict(model)
        for k, dt in (keep_dtype or {}).items():
            if k in tensors and tensors[k].is_floating_point() and tensors[k].dtype != dt:
                tensors[k] = tensors[k].to(dt)
        if sum(t.numel() * t.element_size() for t in tensors.values()) <= max_shard_size:
            save_file(tensors, str(tmp / WEIGHTS), metadata=_METADATA)
            record = dict(record, shards=1)
        else:
            writer = ShardWriter(tmp, max_shard_size)
            for k, t in tensors.items():
                writer.add({k: t})
            record = dict(record, shards=len(writer.close()))
        write_record(tmp, model, record)
    return out


_METADATA = {"format": "pt", "lowbit_version": __version__}


class ShardWriter:
    """Write tensors into safetensors shards as they come, holding none of them in memory.

        w = ShardWriter(folder, max_shard_size)
        w.add({"model.layers.0.mlp.up_proj.qweight": t, ...})   # any number of times
        w.close() -> [file names]

    Each shard's tensor bytes are appended to a data file as they arrive; when the next tensor
    would take the shard past ``max_shard_size`` (a tensor larger than that gets a shard of its
    own), the shard is finished: its header is written and the bytes copied behind it, largest
    element size first (so every tensor is aligned), under a provisional name. ``close``
    renames the shards to ``model-0000k-of-0000n.safetensors`` and writes the index, or, for a
    single shard, names it ``model.safetensors`` with no index (as a small checkpoint always was).
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int = DEFAULT_MAX_SHARD):
        if max_shard_size <= 0:
            raise LowbitError(f"the maximum shard size must be positive, got {max_shard_size}")
        self.folder = Path(folder)
        self.max = int(max_shard_size)
        self.done: list[tuple[Path, list[str]]] = []  # finished shards: provisional file, names
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # current: code, shape, start, n
        self.size = 0
        self.total = 0
        self.names: set[str] = set()
        self._data = None

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            self.add_parts(k, t.dtype, tuple(t.shape), [t])

    def add_parts(self, k: str, dtype: torch.dtype, shape: tuple[int, ...], parts) -> None:
        """One tensor given as consecutive pieces of its bytes in row-major order (e.g. row
        slices of a large embedding read one at a time): never whole in memory."""
        if k in self.names:
            raise LowbitError(f"tensor {k} written twice")
        self.names.add(k)
        code = _CODES.get(dtype)
        if code is None:
            raise LowbitError(f"tensor {k} has dtype {dtype}, which safetensors cannot store")
        n = math.prod(shape) * _ITEMSIZE[code]
        if self.entries and self.size + n > self.max:
            self._finish()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.done) + 1:05d}.data", "w+b")
        start = self._data.tell()
        for t in parts:
            t = t.detach().to("cpu").contiguous()
            if t.dtype != dtype:
                raise LowbitError(f"tensor {k}: a part has dtype {t.dtype}, expected {dtype}")
            if t.numel():
                self._data.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no copy
        if self._data.tell() - start != n:
            raise LowbitError(f"tensor {k}: its parts hold {self._data.tell() - start} bytes, its shape "
                              f"{list(shape)} needs {n}")
        self.entries[k] = (code, tuple(shape), self.size, n)
        self.size += n
        self.total += n

    def _finish(self) -> None:
        """Header + the data file's bytes in aligned order -> a provisional shard file."""
        order = sorted(self.entries, key=lambda k: (-_ITEMSIZE[self.entries[k][0]], k))
        header, pos = {"__metadata__": _METADATA}, 0
        for k in order:
            code, shape, _, n = self.entries[k]
            header[k] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shard = self.folder / f".shard-{len(self.done) + 1:05d}.safetensors"
        data = self._data if self._data is not None else open(os.devnull, "rb")
        with open(shard, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for k in order:
                _, _, start, n = self.entries[k]
                data.seek(start)
                while n:
                    chunk = data.read(min(n, 1 << 24))
                    f.write(chunk)
                    n -= len(chunk)
        data.close()
        if self._data is not None:
            os.unlink(data.name)
        self.done.append((shard, order))
        self._data, self.entries, self.size = None, {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, give every shard its final name (and the index); return them."""
        if self.entries or not self.done:
            self._finish()
        n = len(self.done)
        if n == 1:
            os.replace(self.done[0][0], self.folder / WEIGHTS)
            return [WEIGHTS]
        weight_map, files = {}, []
        for i, (shard, names) in enumerate(self.done, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(shard, self.folder / name)
            files.append(name)
            weight_map.update({k: name for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_ITEMSIZE = {code: torch.empty(0, dtype=dt).element_size() for dt, code in _CODES.items()}


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards its index lists."""
    path = Path(path)
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"{index} is not a valid safetensors index: {e}") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise LowbitError(f"checkpoint {path} lacks shard {missing[0]} listed in {INDEX}")
        return [path / f for f in files]
    if not (path / WEIGHTS).is_file():
        raise LowbitError(f"checkpoint {path} has no {WEIGHTS}")
    return [path / WEIGHTS]


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (single file or shards), on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for wfile in weight_files(path):
        try:
            part = load_file(str(wfile))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LowbitError(f"{wfile} is corrupt or truncated: {str(e).splitlines()[0]}") from None
        dup = next((k for k in part if k in tensors), None)
        if dup is not None:
            raise LowbitError(f"checkpoint {path}: tensor {dup} is stored twice")
        tensors.update(part)
    return tensors


def read_record(path: str | os.PathLike) -> dict:
    p = Path(path) / RECORD
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{path} is not a lowbit checkpoint (no {RECORD})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{p} is corrupt: {e}") from None
    if not isinstance(rec, dict) or "modules" not in rec or "method" not in rec:
        raise LowbitError(f"{p} is not a valid lowbit record (missing 'method' or 'modules')")
    method = rec["method"]
    if not isinstance(method, dict) or not isinstance(method.get("method"), str):
        raise LowbitError(f"{p}: 'method' must be a mapping naming the method, got {str(method)[:60]!r}")
    if not isinstance(rec["modules"], dict):
        raise LowbitError(f"{p}: 'modules' must map module names to their formats")
    for name, meta in rec["modules"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), str):
            raise LowbitError(f"{p}: module {name}: its entry must be a mapping with a 'format' name, "
                              f"got {str(meta)[:60]!r}")
    tied = rec.get("tied_word_embeddings")
    if tied is not None and not isinstance(tied, bool):
        raise LowbitError(f"{p}: 'tied_word_embeddings' must be true or false, got {str(tied)[:60]!r}")
    return rec


def _install(model: nn.Module, name: str, qmod: nn.Module, where: str) -> nn.Module:
    """Put a quantized module built from a record in the model skeleton in place of the float one,
    whose shape (from config.json) it must have; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
    except AttributeError:
        raise LowbitError(f"{where}: module {name} does not exist in {type(model).__name__}") from None
    if isinstance(old, nn.Linear):
        want, kind = (old.out_features, old.in_features), "linear"
    elif isinstance(old, nn.Embedding):
        want, kind = (old.num_embeddings, old.embedding_dim), "embedding"
    else:
        raise LowbitError(f"{where}: module {name} is a {type(old).__name__}, not a linear layer or embedding")
    got = (qmod.num_embeddings, qmod.embedding_dim) if isinstance(qmod, QuantizedEmbedding) else \
        (qmod.out_features, qmod.in_features)
    if isinstance(qmod, QuantizedEmbedding) != (kind == "embedding") or tuple(got) != want:
        raise LowbitError(f"{where}: module {name} is stored with shape {list(got)}, but the model's {kind} "
                          f"is {list(want)}")
    setattr(parent, child, qmod)
    return old


_NOTED: set[str] = set()


def note_version(path: str | os.PathLike, rec: dict) -> None:
    """Say (once per checkpoint and process) that a checkpoint was written by another lowbit version."""
    v = rec.get("lowbit_version")
    key = str(Path(path).absolute())
    if v != __version__ and key not in _NOTED:
        from lowbit.core.log import log

        _NOTED.add(key)
        log(f"{path} was written by lowbit {v if isinstance(v, str) else '(version not recorded)'}; this is lowbit "
            f"{__version__}: its formats are read as recorded (re-quantize it if loading fails)")


def load(path: str | os.PathLike):
    """Load a checkpoint written by `save`: returns (model, tokenizer, record)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    rec = read_record(path)
    note_version(path, rec)
    verify_files(path, rec)
    tensors = read_tensors(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a bad config
        raise LowbitError(f"{path}/config.json cannot be read: {str(e).splitlines()[0]}") from None
    hf_config.strip(config)  # the model built here is lowbit's, not transformers' quantizer's
    # Parameters start on the meta device (no memory): every one of them is either replaced by a
    # QuantizedLinear built from the file's tensors or assigned the file's own tensor below, so
    # the float model is never materialised (an int4 SmolLM2 checkpoint loads in ~0.4 GB instead
    # of ~1.1 GB). Buffers (rotary frequencies, Gemma's embedding scale) are computed on the CPU
    # as usual: they are not stored in checkpoints.
    from accelerate import init_empty_weights

    with torch.device("cpu"), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name, meta in rec["modules"].items():
        prefix = name + "."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        bias = own.pop("bias", None)
        try:
            qmod = module_from_meta(meta, own, bias)
        except KeyError as e:
            raise LowbitError(f"checkpoint {path}: module {name} lacks tensor {e}") from None
        except LowbitError as e:  # the format's own validation: say which module
            raise LowbitError(f"checkpoint {path}: module {name}: {e}") from None
        _install(model, name, qmod, f"checkpoint {path}")
    want = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    for k, t in tensors.items():  # assign keeps the file's dtype: give each tensor the model's
        if k in want and t.is_floating_point() and t.dtype != want[k]:
            tensors[k] = t.to(want[k])
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    qprefixes = tuple(n + "." for n in rec["modules"])
    missing = [m for m in missing if not m.startswith(qprefixes)]  # loaded into QuantizedLinear above
    if rec.get("tied_word_embeddings"):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if unexpected:
        raise LowbitError(f"checkpoint {path} has unexpected tensors, e.g. {unexpected[0]}")
    if missing:
        raise LowbitError(f"checkpoint {path} lacks tensors, e.g. {missing[0]}")
    left = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if left is not None:
        raise LowbitError(f"checkpoint {path} lacks tensors, e.g. {left}")
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(f"checkpoint {path}: tensor {k} has NaN/Inf values")
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, rec


# -- lazy loading: one module at a time ------------------------------------------------------------
class LazyCheckpoint:
    """A checkpoint whose tensors stay on disk until ``materialize(prefix)``: the same interface as
    :class:`lowbit.models.lazy.LazyModel` (``.model``, ``materialize``, ``release``), so a quantized
    model too large for memory can be run block by block (:mod:`lowbit.eval.streaming`).

    ``model`` is the skeleton (parameters on the meta device, buffers real); materializing a prefix
    installs the quantized modules under it, built from their stored tensors exactly as
    :func:`load` builds them, and the float tensors under it (in ``dtype``; None: as stored, as
    :class:`lowbit.models.lazy.LazyModel` does); ``release`` puts the meta placeholders back."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open
        from transformers import AutoConfig

        from lowbit.models.lazy import build_skeleton

        self.path = Path(path)
        self.record = read_record(self.path)
        note_version(self.path, self.record)
        verify_files(self.path, self.record)
        self.files: dict[str, Path] = {}
        self.sizes: dict[str, int] = {}  # stored bytes of each tensor
        for wfile in weight_files(self.path):
            try:
                with safe_open(str(wfile), framework="pt") as f:
                    for k in f.keys():
                        if k in self.files:
                            raise LowbitError(f"checkpoint {self.path}: tensor {k} is stored twice")
                        self.files[k] = wfile
                        sl = f.get_slice(k)
                        self.sizes[k] = math.prod(sl.get_shape()) * _ITEMSIZE.get(sl.get_dtype(), 4)
            except LowbitError:
                raise
            except Exception as e:  # SafetensorError, OSError
                raise LowbitError(f"{wfile} is corrupt or truncated: {str(e).splitlines()[0]}") from None
        try:
            config = AutoConfig.from_pretrained(self.path)
        except Exception as e:  # transformers raises many types for a bad config
            raise LowbitError(f"{self.path}/config.json cannot be read: {str(e).splitlines()[0]}") from None
        hf_config.strip(config)
        config.tie_word_embeddings = bool(self.record.get("tied_word_embeddings"))
        self.model = build_skeleton(config)
        from lowbit.models.families import family_of

        self._blocks = family_of(self.model).blocks
        self.modules: dict[str, dict] = self.record["modules"]
        self._placeholders: dict[str, nn.Module] = {}  # quantized module name -> the skeleton's module
        by_id: dict[int, list[str]] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        self._tied = {n: names for names in by_id.values() for n in names}  # name -> every name sharing it

    def linear_bits(self) -> tuple[float, int, int]:
        """:func:`lowbit.eval.size.linear_bits` of the loaded checkpoint, from the headers: a quantized
        layer counts its stored tensors (its format's), a float one its float32 weight."""
        from lowbit.models.families import find_blocks

        nbytes = n = 0
        for i, blk in enumerate(find_blocks(self.model)):
            prefix = f"{self._blocks}.{i}."
            for name, mod in blk.named_modules():
                if not isinstance(mod, nn.Linear):
                    continue
                full = prefix + name
                if full in self.modules:
                    n += mod.in_features * mod.out_features
                    nbytes += sum(b for k, b in self.sizes.items() if k.startswith(full + ".") and k != full + ".bias")
                else:
                    n += mod.weight.numel()
                    nbytes += mod.weight.numel() * mod.weight.element_size()
        return (8 * nbytes / n if n else float("nan")), nbytes, n

    def _read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors, float ones converted to ``dtype`` (a slice of rows at a time) if given."""
        from safetensors import safe_open

        from lowbit.models.files import read_converted

        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for wfile, group in by_file.items():
            try:
                with safe_open(str(wfile), framework="pt") as f:
                    for n in group:
                        out[n] = read_converted(f, n, dtype)
            except Exception as e:
                raise LowbitError(f"{wfile} is corrupt or truncated: {str(e).splitlines()[0]}") from None
        return out

    def _under(self, name: str, prefix: str) -> bool:
        return not prefix or name == prefix or name.startswith(prefix + ".")

    def materialize(self, prefix: str = "", dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        for name, meta in self.modules.items():
            if not self._under(name, prefix) or name in self._placeholders:
                continue
            own = self._read([k for k in self.files if k.startswith(name + ".")])
            own = {k[len(name) + 1:]: t for k, t in own.items()}
            bias = own.pop("bias", None)
            try:
                qmod = module_from_meta(meta, own, bias)
            except KeyError as e:
                raise LowbitError(f"checkpoint {self.path}: module {name} lacks tensor {e}") from None
            if torch.device(device).type != "cpu":
                qmod = qmod.to(device)
            self._placeholders[name] = _install(self.model, name, qmod, f"checkpoint {self.path}")
        module = self.model.get_submodule(prefix) if prefix else self.model
        dotted = f"{prefix}." if prefix else ""
        for n, p in list(module.named_parameters()):
            if not p.is_meta:
                continue
            names = self._tied.get(dotted + n, [dotted + n])
            stored = next((a for a in names if a in self.files), None)
            if stored is None:
                raise LowbitError(f"checkpoint {self.path} lacks tensor {dotted + n}")
            t = self._read([stored], dtype)[stored]
            if t.is_floating_point() and not all_finite(t):
                raise LowbitError(f"checkpoint {self.path}: tensor {stored} has NaN/Inf values")
            new = nn.Parameter(t.to(device), requires_grad=False)
            for a in names:
                _set_param(self.model, a, new)
        return module

    def release(self, prefix: str = "") -> None:
        for name in [n for n in self._placeholders if self._under(n, prefix)]:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, self._placeholders.pop(name))
        module = self.model.get_submodule(prefix) if prefix else self.model
        dotted = f"{prefix}." if prefix else ""
        for n, p in list(module.named_parameters()):
            if p.is_meta:
                continue
            names = self._tied.get(dotted + n, [dotted + n])
            meta = nn.Parameter(p.detach().to("meta"), requires_grad=False)
            for a in names:
                _set_param(self.model, a, meta)


def _set_param(root: nn.Module, name: str, value: nn.Parameter) -> None:
    mod_name, _, attr = name.rpartition(".")
    (root.get_submodule(mod_name) if mod_name else root)._parameters[attr] = value


def open_lazy(path: str | os.PathLike) -> LazyCheckpoint:
    """A checkpoint opened lazily (:class:`LazyCheckpoint`): reads its record, config and headers."""
    return LazyCheckpoint(path)
