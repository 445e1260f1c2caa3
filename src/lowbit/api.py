"""The Python API; the CLI is a thin layer over these functions.

    import lowbit
    m = lowbit.api.load()                                   # embedded default (SmolLM2-135M)
    rec = lowbit.api.quantize(m, "rtn", QuantScheme(bits=4, group_size=128))
    lowbit.api.save(m, "out/smollm2-int4", rec)
    q = lowbit.api.load("out/smollm2-int4")                  # bit-identical logits

Models larger than memory: ``load(spec, stream=True)`` opens an HF directory without reading its
weights, and ``quantize(m, ..., output=DIR)`` then reads, quantizes and writes one block at a
time (the checkpoint is written during the run; see ``lowbit.calibration.sequential``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit import checkpoint, outputs
from lowbit.algorithms.base import make_method
from lowbit.algorithms.head_embed import HEAD_SCHEMES, quantize_embedding, quantize_head
from lowbit.calibration.sequential import apply_data_free, run_sequential
from lowbit.core import processes
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.training import lkd as _lkd  # noqa: F401 (registers the lkd_* options every method takes)
from lowbit.version import __version__


@dataclass
class Model:
    """A model lowbit works on: the HF module, its tokenizer, where it came from, and (for a
    quantized checkpoint) the record of how it was made."""

    model: nn.Module
    tokenizer: object
    name: str
    source: dict
    record: dict | None = None
    path: str | None = None
    extra: dict = field(default_factory=dict)
    lazy: object | None = None  # a lowbit.models.lazy.LazyModel when opened with stream=True


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(dtype: str | torch.dtype | None, device: str = "cpu", source: torch.dtype | None = None) -> torch.dtype:
    """The dtype blocks are loaded and computed in: ``dtype`` if given; else the checkpoint's own
    (``source``) on a GPU, and float32 on the CPU (whose bf16/fp16 matmuls are slow and less exact)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype is not None:
        if dtype not in DTYPES:
            raise LowbitError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if str(device).startswith("cuda") and source in DTYPES.values():
        return source
    return torch.float32


def should_stream(spec: str | None, dtype: torch.dtype = torch.float32, fraction: float = 0.5) -> bool:
    """True when the weights of ``spec`` (an HF directory or builtin), converted to ``dtype``,
    would take more than ``fraction`` of the memory available now: loading them whole would
    leave too little for the work (the rule ``lowbit quantize`` applies without --stream)."""
    from lowbit.models.spec import weights_on_disk

    found = weights_on_disk(spec)
    if found is None:
        return False
    nbytes, file_dtype = found
    in_memory = nbytes * torch.empty(0, dtype=dtype).element_size() // torch.empty(0, dtype=file_dtype).element_size()
    return in_memory > fraction * available_memory()


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def load(spec: str | None = None, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
         stream: bool = False) -> Model:
    """Load a builtin model name, a HF directory, a GGUF file, or a lowbit checkpoint directory.

    ``dtype`` (float32, bfloat16, float16) is the dtype the weights are held in; default: see
    ``compute_dtype`` (``device`` is where the work will run). ``stream=True`` reads no weights:
    the model is a skeleton, quantized block by block by ``quantize(..., output=...)``."""
    from lowbit.models.spec import load_model, load_model_lazy, weights_on_disk

    if spec is not None and checkpoint.is_checkpoint(spec):
        if stream:
            raise LowbitError(f"{spec} is a lowbit quantized checkpoint; quantize the original model")
        model, tok, rec = checkpoint.load(spec)
        import os

        return Model(model=model, tokenizer=tok, name=os.path.basename(os.path.normpath(spec)),
                     source={"kind": "lowbit-checkpoint", "path": str(spec)}, record=rec, path=str(spec))
    if stream:
        lazy = load_model_lazy(spec)
        m = Model(model=lazy.model, tokenizer=lazy.tokenizer, name=lazy.name, source=lazy.source, lazy=lazy)
        m.extra["dtype"] = compute_dtype(dtype, device, lazy.dtype)
        return m
    found = weights_on_disk(spec) if dtype is None and str(device).startswith("cuda") else None
    want = compute_dtype(dtype, device, found[1] if found else None)
    lm = load_model(spec, dtype=want)
    m = Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    m.extra["dtype"] = want
    return m


def base_spec(m: Model) -> str | None:
    """The spec that loads the original (unquantized) model behind ``m``. A checkpoint whose
    record names no original (no path, no builtin name) is an error, never the default model
    (None, which would load the builtin)."""
    src = m.record.get("base_model") if m.record else m.source
    spec = None
    if isinstance(src, dict):
        spec = src.get("name") if src.get("kind") == "builtin" else src.get("path")
    if m.record and (not isinstance(spec, str) or not spec):
        where = m.path or m.name or "the checkpoint"
        raise LowbitError(f"{where}: its record names no original model (base_model has no "
                          f"{'name' if isinstance(src, dict) and src.get('kind') == 'builtin' else 'path'}); "
                          "give the original with --baseline")
    return spec


DEFAULT_ACTIVATION_BUDGET = 2 * 2**30


def quantize(m: Model, method: str = "rtn", scheme: QuantScheme | None = None, *,
             calibration_text: str | None = None, n_samples: int = 32, seq_len: int = 512,
             device: str = "cpu", batch_size: int | None = None, force_runner: bool = False,
             progress: bool = True, seed: int = 0, head: str | None = None, embed: str | None = None,
             output: str | None = None, max_shard_size: int = checkpoint.DEFAULT_MAX_SHARD,
             activation_budget: int | None = DEFAULT_ACTIVATION_BUDGET, offload_dir: str | None = None,
             force: bool = False, resume_dir: str | None = None, resume: bool | None = None,
             checkpoint_every: float = 60.0, **options) -> dict:
    """Quantize ``m.model`` in place; return the record describing what was done.

    Methods that need data are run block by block by the sequential runner on calibration
    samples (bundled calibration text unless ``calibration_text`` names a file); data-free
    methods are applied layer by layer directly (``force_runner`` routes them through the
    runner too, which must give the same result). Both work on ``device``. In a torch.distributed
    group of several processes (torchrun) the work is divided among them and every process ends
    with the model one process would have made (`lowbit.calibration.distributed`).

    ``head`` ("int8", "int6" or "int4") also quantizes the output layer (lm_head) with RTN — int8 per
    output channel, int6 in symmetric groups of 16 (like llama.cpp's Q6_K), or int4 in
    asymmetric groups of 32 — untying it from the token embedding, which stays float for the
    lookup. Decoding a small model reads its vocabulary-sized head once per token, so this is
    where most of a 4-bit model's remaining decode time goes. ``embed`` (same choices)
    quantizes the token embedding the same way, row by row (``lowbit.nn.embedding``).

    A model opened with ``load(..., stream=True)`` is quantized block by block straight into the
    checkpoint ``output`` (required then; ``max_shard_size`` bytes per safetensors shard).
    Calibration activations beyond ``activation_budget`` bytes (None: no limit) go to files in
    ``offload_dir`` (default: a temporary folder beside ``output``, or the system's), removed
    at the end.

    ``resume_dir`` (a calibrated method only): keep the finished blocks, and every
    ``checkpoint_every`` seconds the hidden states after them, in that folder
    (`lowbit.calibration.resume`), so that an interrupted run can be continued with
    ``resume=True`` to the same result; ``resume=False`` discards an earlier run's state there,
    None refuses to touch it. `save` (or the streamed write) removes the folder once the
    checkpoint is complete.
    """
    for what, name in (("head", head), ("embedding", embed)):
        if name is not None and name not in HEAD_SCHEMES:
            raise LowbitError(f"{what} quantization must be one of {', '.join(HEAD_SCHEMES)}, got {name!r}")
    if m.record is not None:
        raise LowbitError(f"{m.name} is already quantized ({m.record['method']['method']}); quantize the original model")
    if m.lazy is not None and output is None:
        raise LowbitError("a streamed model is written while it is quantized: give the output directory")
    if m.lazy is not None:
        outputs.check_dir(output, checkpoint.RECORD, force=force, inputs=[m.lazy.path])
    meth = make_method(method, scheme, **options)
    if device != "cpu" and device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device} requested but CUDA is not available")
    t0 = time.perf_counter()
    calib = None
    runner = None
    samples = None
    if meth.needs_calibration or force_runner:
        from lowbit.data.texts import calibration_samples, load_text

        text_name = calibration_text or "calibration"
        samples = calibration_samples(m.tokenizer, n_samples=n_samples, seq_len=seq_len,
                                      text=load_text(text_name), seed=seed)
        calib = {"text": text_name, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}
        if processes.world() > 1:  # scale-out: the runner divides batches and solves (same result)
            calib["world_size"] = processes.world()
    run = dict(device=device, batch_size=batch_size, progress=progress, activation_budget=activation_budget)
    if resume_dir is not None and samples is not None:
        run["state"] = _run_state(m, meth, samples, calib, run, resume_dir, resume, checkpoint_every)

    def record(runner, seconds):
        rec = {
            "method": meth.describe(),
            "base_model": _with_fingerprint(m.source),
            "calibration": calib,
            "runner": runner,
            "quantize_seconds": round(seconds, 3),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "dtype": str(m.extra.get("dtype") or _float_dtype(m.model)).removeprefix("torch."),
            "streaming": m.lazy is not None,
            "peak_rss_bytes": _peak_rss(),
        }
        if head is not None:
            rec["head"] = {"name": head, "scheme": HEAD_SCHEMES[head].to_dict()}
        if embed is not None:
            rec["embed"] = {"name": embed, "scheme": HEAD_SCHEMES[embed].to_dict()}
        return rec

    if m.lazy is not None:
        return _quantize_streamed(m, meth, samples, run, head, embed, output, max_shard_size, offload_dir,
                                  record, t0, force)
    if samples is not None:
        runner = run_sequential(m.model, meth, samples, offload_dir=offload_dir, **run).to_dict()
    else:
        apply_data_free(m.model, meth, progress=progress, device=device)
    if head is not None:
        quantize_head(m.model, HEAD_SCHEMES[head])
    if embed is not None:
        quantize_embedding(m.model, HEAD_SCHEMES[embed])
    m.record = record(runner, time.perf_counter() - t0)
    if run.get("state") is not None:
        m.extra["run_state"] = run["state"]  # removed by `save` once the checkpoint is complete
    return m.record


def _with_fingerprint(source: dict) -> dict:
    """The original's source, with the fingerprint of its files' contents when it has files
    (checked when the checkpoint is later compared with it: `lowbit.eval.compare`)."""
    import os

    from lowbit.models.files import fingerprint

    path = (source or {}).get("path")
    if not path or not os.path.exists(path):
        return source
    return dict(source, fingerprint=fingerprint(path, mtimes=False))


def _run_state(m: Model, meth, samples, calib, run: dict, folder: str, resume: bool | None, every: float):
    """The prepared `lowbit.calibration.resume.RunState` of a calibrated run in ``folder``: its
    key is everything the result depends on."""
    import hashlib
    import os

    from lowbit.calibration.resume import RunState
    from lowbit.calibration.sequential import runner_batch
    from lowbit.models.files import fingerprint
    from lowbit.models.families import find_blocks

    if every < 0:
        raise LowbitError(f"the checkpoint interval must be >= 0 seconds, got {every}")
    blocks = find_blocks(m.model)
    path = (m.source or {}).get("path")
    key = {
        "method": meth.describe(),
        "model": m.source,
        "model_files": fingerprint(path) if path and os.path.exists(path) else None,
        "calibration": calib,
        "samples_sha256": hashlib.sha256(samples.contiguous().numpy().tobytes()).hexdigest(),
        "blocks": len(blocks),
        "batch_size": run["batch_size"] or runner_batch(blocks[0], samples.shape[1]),
        "device": run["device"],
        "dtype": str(m.extra.get("dtype") or _float_dtype(m.model)).removeprefix("torch."),
        "streaming": m.lazy is not None,
        "processes": processes.world(),
        "lowbit": __version__,
        "torch": torch.__version__,
    }
    state = RunState(folder, key, every=every, rank=processes.rank(), world=processes.world())
    state.prepare(resume, what=os.path.basename(os.path.normpath(folder)).removeprefix(".").removesuffix(".resume"))
    return state


def _quantize_streamed(m: Model, meth, samples, run: dict, head, embed, output, max_shard_size, offload_dir,
                       record, t0, force) -> dict:
    """The streaming path of ``quantize``: blocks from the files, tensors into the checkpoint."""
    from pathlib import Path

    from lowbit.calibration.sequential import Streaming
    from lowbit.models.families import family_of

    lazy, model = m.lazy, m.model
    fam = family_of(model)
    out = outputs.check_dir(output, checkpoint.RECORD, force=force)
    prepare = getattr(meth, "prepare_model", None)
    if prepare is not None and getattr(meth.config, "scope", None) == "global":
        raise LowbitError(f"{meth.name} with scope=global ranks the weights of the whole model at once; it cannot "
                          "run streamed (drop --stream, or use the default per-layer scope)")
    main = processes.is_main()  # split over processes (torchrun): process 0 alone writes
    with outputs.atomic_dir(out) if main else contextlib.nullcontext() as tmp:
        if main:
            checkpoint.write_skeleton(tmp, model, m.tokenizer, {"method": meth.describe()})
        writer = checkpoint.ShardWriter(tmp, max_shard_size) if main else _Discard()
        stream = Streaming(lazy, writer, m.extra.get("dtype"))
        runner = None
        if samples is not None:
            offload = offload_dir if offload_dir is not None else str(out.parent)
            runner = run_sequential(model, meth, samples, stream=stream, offload_dir=offload, **run).to_dict()
        else:
            apply_data_free(model, meth, progress=run["progress"], device=run["device"], stream=stream)
        # outside the blocks: the embedding, final norm and head, quantized or as on disk
        done = set()
        for name, scheme, quantizer in ((fam.embed, embed, quantize_embedding), (fam.lm_head, head, quantize_head)):
            if scheme is None:
                continue
            lazy.materialize(name, torch.float32, "cpu")
            quantizer(model, HEAD_SCHEMES[scheme])
            qmod = model.get_submodule(name)
            writer.add({f"{name}.{k}": t for k, t in checkpoint._unique_state_dict(qmod).items()})
            lazy.release("")  # the float tensor (with a tied alias) and the packed buffers
            done.add(name)
        blocks = fam.blocks + "."
        written_groups = set()
        for k, t in model.state_dict(keep_vars=True).items() if main else ():
            if k.startswith(blocks) or any(k.startswith(d + ".") for d in done):
                continue
            group = lazy.first.get(k, k)
            if group in written_groups:
                continue  # a tied alias of a tensor already written
            written_groups.add(group)
            if k in lazy.needed:  # as on disk, a slice of rows at a time (a large embedding never whole)
                writer.add_parts(k, *lazy.read_parts(k))
            else:
                writer.add({k: t})
        shards = writer.close()
        rec = record(runner, time.perf_counter() - t0)
        rec["shards"] = len(shards)
        if main:
            checkpoint.write_record(tmp, model, rec)
    if run.get("state") is not None:  # the checkpoint is complete: the finished blocks are no longer needed
        run["state"].finish()
    m.record = rec
    m.path = str(out)
    return rec


class _Discard:
    """The shard writer of the processes that do not write (split over processes)."""

    def add(self, tensors: dict) -> None:
        pass

    def add_parts(self, k, dtype, shape, parts) -> None:
        pass

    def close(self) -> list:
        return []


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _peak_rss() -> int:
    """The process's peak resident memory so far (bytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def save(m: Model, out_dir: str, max_shard_size: int = checkpoint.DEFAULT_MAX_SHARD, *, force: bool = False) -> str:
    """Write the quantized model as a checkpoint. Unquantized tensors outside the blocks (the
    embedding, final norm, head) are stored in the source model's dtype (bf16 stays bf16).
    Split over processes (torchrun), process 0 writes and the others wait for it."""
    if m.record is None:
        raise LowbitError("model is not quantized; nothing to save (quantize it first)")
    if m.lazy is not None:
        if m.path is not None and str(out_dir) == m.path:
            return m.path
        raise LowbitError(f"a streamed model was written to {m.path} while it was quantized; it cannot be saved again")
    keep = {}
    src = DTYPES.get(str((m.record.get("base_model") or {}).get("dtype")))
    if src is not None and src != torch.float32:
        try:
            from lowbit.models.families import family_of

            blocks = family_of(m.model).blocks + "."
        except LowbitError:
            blocks = None
        if blocks is not None:  # float tensors outside the blocks that no quantized module holds
            packed = tuple(n + "." for n in checkpoint.quantized_modules(m.model))
            keep = {k: src for k, t in m.model.state_dict().items()
                    if not k.startswith(blocks) and not k.startswith(packed) and t.is_floating_point()}
    out = processes.gather(lambda: str(checkpoint.save(m.model, m.tokenizer, out_dir, m.record,
                                                       max_shard_size=max_shard_size, keep_dtype=keep,
                                                       force=force))
                           if processes.is_main() else None)[0]
    state = m.extra.pop("run_state", None)
    if state is not None:  # the checkpoint is complete: an interrupted run's blocks are no longer needed
        state.finish()
    return out
