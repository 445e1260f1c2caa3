"""Scale-out: GPTQ calibrated by two processes (torch.distributed, gloo) on half of the samples
each gives exactly the model that one process calibrated on all samples gives.

Why equality can be exact: `api.quantize` gives rank r the samples r::world; with 2 samples, 2
ranks and batch_size 1, every process runs the very same single-sample batches as the single
process does. GPTQ's statistic is a float64 sum of per-batch x xᵀ (each batch's product computed
identically everywhere), so the single process's (0 + A) + B and the all-reduced A + B are the
same number, and so are the integer token counts: the solver then sees bit-identical Hessians.
(With more batches per rank float64 addition order differs, ~1e-16 relative, which could in rare
cases flip a rounding decision.) Every process uses one thread so no GEMM is split differently.

The same code path runs with the nccl backend on GPUs (statistics live on the device and are
all-reduced there); that cannot be tested on this CPU-only machine.
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit import api
from lowbit.core.scheme import QuantScheme
from tests.tiny import tiny_llama

SCHEME = QuantScheme(3, False, "group", 32)
SEQ_LEN = 48


class CharTokenizer:
    """A tokenizer for the tiny models (vocab 96): one id per character, no special tokens."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) % 96 for c in text]}


def _text(path) -> str:
    path.write_text(" ".join(f"word{i * 7919 % 1000} and {i % 13} more." for i in range(400)))
    return str(path)


def _quantize(text_path: str, n_samples: int) -> api.Model:
    m = api.Model(model=tiny_llama(), tokenizer=CharTokenizer(), name="tiny", source={"kind": "test"})
    api.quantize(m, "gptq", SCHEME, calibration_text=text_path, n_samples=n_samples, seq_len=SEQ_LEN,
                 batch_size=1, progress=False)
    return m


def _worker(rank: int, world: int, port: int, text_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = _quantize(text_path, n_samples=2)
        torch.save({"state": m.model.state_dict(), "record": m.record}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    text = _text(tmp_path / "calib.txt")
    mp.spawn(_worker, args=(2, _free_port(), text, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _quantize(text, n_samples=2).model.state_dict()
        local_only = _quantize(text, n_samples=1).model.state_dict()  # = rank 0's samples, not reduced
    finally:
        torch.set_num_threads(threads)

    packed = [k for k in single if k.endswith((".qweight", ".scales", ".qzeros"))]
    assert len(packed) == 3 * 7 * 3  # 3 blocks x 7 linear layers x (codes, scales, zero-points)
    for r, got in enumerate(ranks):
        assert got["state"].keys() == single.keys()
        for k in single:
            assert torch.equal(got["state"][k], single[k]), (r, k)
        assert got["record"]["calibration"]["world_size"] == 2
        assert got["record"]["runner"]["n_samples"] == 1  # each rank saw only its half
    # the all-reduce mattered: rank 0's samples alone give a different model
    assert any(not torch.equal(local_only[k], single[k]) for k in packed)
