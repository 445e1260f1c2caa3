"""Finished blocks of a calibration run kept on disk, so that an interrupted run resumes.

GPTQ, AWQ, SparseGPT and the other calibrated methods work block by block, and block ``i + 1``
needs only two things from the work before it: the quantized blocks ``0 .. i`` and the hidden
states that leave block ``i`` (the inputs of block ``i + 1`` for every calibration batch).  The
runner (`lowbit.calibration.sequential.run_sequential`) hands both to a `RunState`:

* each quantized block, as soon as it is final, to ``block-NNNNN.safetensors`` (its tensors, and
  each quantized module's format in the header);
* at most every ``every`` seconds (and never before a block is finished), the hidden states
  leaving the last finished block to ``x-NNNNN/`` (one file per batch, per process under
  torchrun), then ``state.json``: how many blocks are done, the run's key and the method's
  per-layer records (its ``layer_records``: GPTQ's errors, Wanda's sparsities, ...), written
  last and atomically, so it only ever names complete files.

``lowbit quantize --resume`` reads ``state.json``, installs the finished blocks, loads the
hidden states and goes on from the next block.  Every tensor it reads is the exact one the
interrupted run held, so the checkpoint is bit-identical to an uninterrupted run's (on the same
machine, thread count and library versions: the key records what else the numbers depend on, and
a state made with other settings is refused, naming the difference).

The folder is ``.NAME.resume`` beside the output NAME (`lowbit.outputs.resume_dir`); it is
removed once the output is complete.  Safetensors only: nothing in it is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit import outputs
from lowbit.errors import LowbitError

STATE = "state.json"
FORMAT = 1


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    with outputs.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _describe_difference(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return "nothing"
    k = keys[0]
    return f"{k}: {json.dumps(old.get(k), default=str)[:80]} then, {json.dumps(new.get(k), default=str)[:80]} now"


def _unasked(st: dict, folder: Path, what: str) -> LowbitError:
    total = st["key"].get("blocks", "?")
    return LowbitError(f"{what} has {st['done']} of {total} blocks of an interrupted run in {folder}: "
                       "--resume continues it, --no-resume starts over")


def check_asked(folder: str | os.PathLike, resume: bool | None, what: str) -> None:
    """Before any work: a folder holding an interrupted run's finished blocks needs ``--resume``
    or ``--no-resume`` (the one-line error says so); nothing to decide otherwise."""
    if resume is None:
        st = RunState(folder, {})._read_state()
        if st is not None and st["done"] > 0:
            raise _unasked(st, Path(folder), what)


class RunState:
    """The resume folder of one calibration run (module docstring).

    ``key``: everything the run's numbers depend on (JSON-serialisable); ``every``: seconds
    between two saves of the hidden states (0: after every block).  ``rank``/``world``: this
    process's place in a torchrun group; process 0 writes the blocks and ``state.json``, every
    process its own hidden states."""

    def __init__(self, folder: str | os.PathLike, key: dict, *, every: float = 60.0, rank: int = 0,
                 world: int = 1):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key, default=str))  # as it reads back from state.json
        self.every = float(every)
        self.rank, self.world = rank, world
        self.done = 0           # blocks finished and on disk (after `prepare`, or the last save)
        self.records: dict = {}
        self._last_save = time.monotonic()
        self._x: str | None = None

    # -- start ------------------------------------------------------------------------------------
    def _read_state(self) -> dict | None:
        p = self.folder / STATE
        if not p.exists():
            return None
        try:
            st = json.loads(p.read_text())
            if not isinstance(st, dict) or not isinstance(st.get("done"), int) or not isinstance(st.get("key"), dict):
                raise ValueError("not a state record")
        except (OSError, ValueError) as e:
            raise LowbitError(f"{p} is corrupt ({str(e)[:80]}); --no-resume discards it") from None
        return st

    def prepare(self, resume: bool | None, what: str) -> int:
        """Decide what to do with an earlier run's state; return the number of finished blocks
        this run starts from. ``resume``: True continues it (the key must match), False discards
        it, None (not said) refuses to touch it, so finished work is never dropped unasked.
        ``what`` names the output in messages."""
        if resume is False:  # discarded unread: a damaged state must not stand in the way
            self._reset()
            return 0
        st = self._read_state()
        if st is None or st["done"] == 0:
            if resume and self.rank == 0:
                from lowbit.core.log import log

                log(f"nothing to resume for {what}: starting from the first block")
            self._reset()
            return 0
        if resume is None:
            raise _unasked(st, self.folder, what)
        if st.get("format") != FORMAT or st["key"] != self.key:
            raise LowbitError(f"the interrupted run in {self.folder} had other settings "
                              f"({_describe_difference(st['key'], self.key)}); --no-resume starts over")
        x = self.folder / str(st.get("x"))
        mine = sorted(x.glob(f"rank{self.rank}-batch-*.safetensors")) if x.is_dir() else []
        if len(mine) != st.get("batches", {}).get(str(self.rank)):
            raise LowbitError(f"the interrupted run in {self.folder} is incomplete ({x.name} lacks hidden states of "
                              f"process {self.rank}); --no-resume starts over")
        for i in range(st["done"]):
            if not self.block_path(i).is_file():
                raise LowbitError(f"the interrupted run in {self.folder} lacks {self.block_path(i).name}; "
                                  "--no-resume starts over")
        self.done, self.records, self._x = st["done"], st.get("records", {}), st["x"]
        return self.done

    def _reset(self) -> None:
        if self.rank == 0 and self.folder.exists():
            shutil.rmtree(self.folder)
        self._barrier()
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._barrier()
        self.done, self.records, self._x = 0, {}, None

    def _barrier(self) -> None:
        if self.world > 1:
            from lowbit.core import processes

            processes.barrier()

    # -- blocks -----------------------------------------------------------------------------------
    def block_path(self, i: int) -> Path:
        return self.folder / f"block-{i:05d}.safetensors"

    def save_block(self, i: int, block: nn.Module) -> None:
        """Block ``i`` is final: its tensors, and the format of each quantized module in it."""
        if self.rank != 0:
            return
        from lowbit.checkpoint import _unique_state_dict, quantized_modules

        metas = {n: m.meta() for n, m in quantized_modules(block).items()}
        _atomic_save(_unique_state_dict(block), self.block_path(i), {"modules": json.dumps(metas, default=str)})

    def restore_block(self, i: int, block: nn.Module, where: str) -> None:
        """Block ``i`` as it was finished: its quantized modules built from the file and put in
        ``block``, its other tensors (norms) assigned."""
        from safetensors import safe_open

        from lowbit.checkpoint import _install
        from lowbit.nn import module_from_meta

        path = self.block_path(i)
        try:
            with safe_open(str(path), "pt") as f:
                metas = json.loads((f.metadata() or {}).get("modules", "{}"))
                left = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError, ValueError) as e:
            raise LowbitError(f"{path} is corrupt ({str(e)[:80]}); --no-resume starts over") from None
        for name, meta in metas.items():
            own = {k[len(name) + 1:]: left.pop(k) for k in list(left) if k.startswith(name + ".")}
            bias = own.pop("bias", None)
            try:
                qmod = module_from_meta(meta, own, bias)
            except (KeyError, LowbitError) as e:
                raise LowbitError(f"{path}: module {name} cannot be rebuilt ({e}); --no-resume starts over") from None
            _install(block, name, qmod, where)
        block.load_state_dict(left, strict=False, assign=True)

    # -- hidden states ----------------------------------------------------------------------------
    def due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every

    def save_progress(self, done: int, X, method) -> None:
        """``done`` blocks are finished (each saved by `save_block`) and ``X`` holds the hidden
        states leaving the last of them: make that the point a resumed run starts from."""
        name = f"x-{done:05d}"
        x = self.folder / name
        if self.rank == 0 and x.exists():
            shutil.rmtree(x)
        self._barrier()
        x.mkdir(parents=True, exist_ok=True)
        for j, t in enumerate(X):
            _atomic_save({"x": t.detach().to("cpu").contiguous()}, x / f"rank{self.rank}-batch-{j:06d}.safetensors")
        n = len(X)
        if self.world > 1:
            from lowbit.core import processes

            counts = processes.gather(lambda: n)
        else:
            counts = [n]
        if self.rank == 0:
            records = {a: getattr(method, a) for a in method.layer_records}
            st = {"format": FORMAT, "done": done, "x": name, "batches": {str(r): c for r, c in enumerate(counts)},
                  "key": self.key, "records": records}
            with outputs.atomic_file(self.folder / STATE) as tmp:
                tmp.write_text(json.dumps(st, default=float) + "\n")
            for old in self.folder.glob("x-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self.done, self._x = done, name
        self._last_save = time.monotonic()

    def load_activations(self, store) -> None:
        """This process's saved hidden states appended to ``store`` (an ``Activations``), in order."""
        x = self.folder / str(self._x)
        for p in sorted(x.glob(f"rank{self.rank}-batch-*.safetensors")):
            try:
                t = load_file(str(p))["x"]
            except (OSError, SafetensorError, KeyError) as e:
                raise LowbitError(f"{p} is corrupt ({str(e)[:80]}); --no-resume starts over") from None
            store.append(t.to(store.pool.device))

    def restore_records(self, method) -> None:
        for attr, entries in self.records.items():
            if attr in method.layer_records and isinstance(entries, dict):
                getattr(method, attr).update(entries)

    # -- end --------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The output is complete: the folder goes."""
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
