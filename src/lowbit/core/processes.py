"""The processes one lowbit run is split over: one, or several started by torchrun.

    torchrun --nproc-per-node 2 -m lowbit.cli quantize ...      (or: torchrun --no-python lowbit ...)

`init_from_env` joins the process group that torchrun describes in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo for work on the CPU, nccl for work on
GPUs (process i uses cuda:LOCAL_RANK). Everything else here works in one process too, where it
does the obvious thing (`rank()` 0, `world()` 1, `gather(fn)` ``[fn()]``), so callers need no
second code path. How the calibration runner splits its work is `lowbit.calibration.distributed`.

Objects cross processes as ``torch.save`` bytes (tensors exactly, GPU tensors landing on the
receiving process's GPU). An exception in any process's share of a `gather` is raised in every
process (`PeerError` elsewhere), so no process is left waiting for one that has failed.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, TypeVar

import torch

from lowbit.errors import LowbitError

T = TypeVar("T")


class PeerError(LowbitError):
    """Another process failed (it reports its own error); this one stops too."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> int:
    """Number of processes in the run (1 unless torch.distributed is initialised)."""
    d = _dist()
    return d.get_world_size() if d is not None else 1


def rank() -> int:
    """This process's index, 0 .. world() - 1."""
    d = _dist()
    return d.get_rank() if d is not None else 0


def is_main() -> bool:
    """True in the process that prints and writes (rank 0)."""
    return rank() == 0


def thread_invariant_products() -> bool:
    """Ask MKL for matrix products whose bits do not depend on the number of threads (its
    conditional numerical reproducibility, strict mode: ``MKL_CBWR=AUTO,STRICT``). By default a
    large product (a Hessian's X^T X over 16k tokens, a down projection over 8192 inputs) splits
    its sums differently on 1 and 2 threads, so a torchrun process (one thread) and a one-process
    run (all cores) differ in the last bits at real model sizes; small shapes do not split.
    Takes effect if called before the process's first product (MKL reads it then); returns
    whether it is now set. An existing ``MKL_CBWR`` is left as it is. Without MKL (another BLAS)
    it changes nothing. LAPACK's factorizations stay thread-dependent: the solvers run them on one
    thread."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    return os.environ["MKL_CBWR"].upper().endswith(",STRICT")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "cpu") -> str:
    """Join torchrun's process group when the environment names more than one process; return
    the device this process computes on (``cuda`` becomes ``cuda:LOCAL_RANK``). Without torchrun
    (or when a group exists already) nothing happens and ``device`` is returned unchanged."""
    import torch.distributed as dist

    if not launched_by_torchrun() or dist.is_initialized():
        return device
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LowbitError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {var} is not set; start several "
                              "processes with torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if ":" in device:
            raise LowbitError(f"under torchrun process i uses cuda:LOCAL_RANK; give --device cuda, not {device}")
        if not torch.cuda.is_available():
            raise LowbitError(f"device {device} requested but CUDA is not available")
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def finish(clean: bool = False) -> None:
    """Leave the process group (a no-op in one process): the last collective step of a run.

    ``clean`` (every process got here without an error): wait for all of them first, so that no
    process tears its connections down while a peer's last message is still in flight (gloo
    aborts the peer with "terminate called without an active exception" otherwise)."""
    d = _dist()
    if d is not None:
        if clean:
            try:
                d.barrier()
            except Exception:  # a peer already gone: nothing left to wait for
                pass
        d.destroy_process_group()


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def transport_device() -> torch.device:
    """Where tensors sent between processes must live: the GPU for nccl, the CPU for gloo."""
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    loc = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        here = f"cuda:{torch.cuda.current_device()}"
        loc = {f"cuda:{i}": here for i in range(torch.cuda.device_count())}
    return torch.load(io.BytesIO(data), map_location=loc, weights_only=False)


def _all_gather_bytes(data: bytes) -> list[bytes]:
    d = _dist()
    dev = transport_device()
    n = d.get_world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    d.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.empty(longest, dtype=torch.uint8, device=dev) for _ in range(n)]
    d.all_gather(bufs, mine)
    return [b[:int(s.item())].cpu().numpy().tobytes() for b, s in zip(bufs, sizes)]


def gather(fn: Callable[[], T]) -> list[T]:
    """Run ``fn`` in this process and return every process's result, in rank order.

    Every process must call `gather` at the same point. If ``fn`` raises in some process, the
    exception is raised again here (this process's own exception as it was; another's as a
    `PeerError` naming that process), in every process."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [fn()]
    failure: BaseException | None = None
    try:
        payload: tuple = (True, fn())
    except Exception as e:  # reported to the others, then raised here below
        failure = e
        payload = (False, f"{e}" if isinstance(e, LowbitError) else f"{type(e).__name__}: {e}")
    gathered = [_from_bytes(b) for b in _all_gather_bytes(_to_bytes(payload))]
    if failure is not None:
        raise failure
    for r, (ok, value) in enumerate(gathered):
        if not ok:
            raise PeerError(f"process {r} of {len(gathered)} failed: {value}")
    return [value for _, value in gathered]


def share(fn: Callable[[], dict[Any, T]]) -> dict[Any, T]:
    """Union of the dicts ``fn`` returns in every process (each process computes some of the
    entries; all end with all of them). In one process: ``fn()``."""
    out: dict[Any, T] = {}
    for part in gather(fn):
        out.update(part)
    return out
