"""Scale-out: a run split over several processes makes the very checkpoint one process makes.

`lowbit.calibration.distributed` deals the calibration batches round-robin over the processes,
sends each layer's inputs to the process that owns the layer (which observes them in the
one-process batch order), solves each layer in its owner and gathers the results everywhere;
data-free methods deal whole blocks. Equality here is byte equality of the checkpoint
(tests/test_golden's `checkpoint_digest`), with the processes on one thread each (as torchrun
sets them) and the single process on the default number of threads.

The same code runs with the nccl backend on GPUs (tensors move between processes on the GPU);
this CPU machine tests gloo.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.algorithms.base import Method, make_method
from lowbit.calibration.distributed import Split, balance, layer_cost
from lowbit.core import processes
from lowbit.core.scheme import QuantScheme
from lowbit.errors import LowbitError
from lowbit.models.tiny import save_tiny, tiny_model
from tests.test_golden import checkpoint_digest

G32 = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=32)
G16A = QuantScheme(bits=3, symmetric=False, granularity="group", group_size=16)
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _text(path: Path) -> str:
    path.write_text(" ".join(f"word{i * 7919 % 1000} and {i % 13} more." for i in range(300)))
    return str(path)


# -- the pieces, in one process --------------------------------------------------------------------
def test_balance_is_longest_first_to_least_loaded():
    costs = {"q": 4, "k": 2, "v": 2, "o": 4, "gate": 9, "up": 9, "down": 9}
    owner = balance(costs, 2)
    assert owner == {"gate": 0, "up": 1, "down": 0, "q": 1, "o": 1, "k": 1, "v": 0}
    loads = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert loads == [20, 19]
    assert balance(costs, 1) == dict.fromkeys(costs, 0)
    assert set(balance({"a": 1}, 3).values()) == {0}
    lin = torch.nn.Linear(64, 128)
    assert layer_cost(lin) == 64 * (64 + 128)


@pytest.mark.parametrize("n, batch, world", [(20, 8, 2), (5, 2, 3), (4, 2, 3), (1, 8, 2), (9, 3, 4)])
def test_own_samples_are_the_one_process_batches(n, batch, world):
    samples = torch.arange(n * 3).reshape(n, 3)
    single = list(samples.split(batch))
    got = {}
    for r in range(world):
        sp = Split(rank=r, world=world)
        own = sp.own_samples(samples, batch)
        assert sp.n_batches == len(single)
        for k, b in enumerate(own.split(batch) if own.shape[0] else []):
            got[r + k * world] = b
    assert sorted(got) == list(range(len(single)))
    assert all(torch.equal(got[j], single[j]) for j in got)


def test_awq_layouts_allow_searching_before_folding():
    """AWQ searches every scaling group of a block before folding any (so the searches can run
    in different processes): no group may read a linear that an earlier group's fold changes."""
    from lowbit.models.families import FAMILIES, awq_layout

    for model_type in FAMILIES:
        changed: set[str] = set()
        for g in awq_layout(model_type).groups:
            assert not changed & set(g.linears), (model_type, g)
            changed |= set(g.linears) | {g.prev}


def test_a_block_transform_must_declare_it_splits():
    class Whole(Method):
        name = "whole"

        def transform_block(self, block, prefix, inputs, block_kwargs):
            pass

    with pytest.raises(LowbitError, match="does not support splitting"):
        Split(rank=0, world=2).check(Whole(None))
    for name in ("awq", "static-int8", "gptq", "rtn"):
        Split(rank=0, world=2).check(make_method(name))


def test_one_process_needs_no_group():
    assert (processes.rank(), processes.world(), processes.is_main()) == (0, 1, True)
    assert processes.gather(lambda: 7) == [7]
    assert processes.share(lambda: {"a": 1}) == {"a": 1}
    assert Split.current() is None
    assert processes.init_from_env("cpu") == "cpu"  # no WORLD_SIZE: nothing to join


def test_cli_splits_only_quantize_and_prune(monkeypatch, capsys):
    from lowbit import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["methods"]) == 2
    assert "lowbit methods runs in one process" in capsys.readouterr().err
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["quantize", "x", "-o", "y"]) == 2
    assert "RANK is not set; start several processes with torchrun" in capsys.readouterr().err


# -- several processes through the API -----------------------------------------------------------
# (case id, family, method, scheme, api.quantize keyword arguments). Batches of 2: 5 samples are
# 3 batches (the last short) for 3 processes; 3 samples are 2 batches, so one process has none.
CASES = [
    ("gptq", "llama", "gptq", G32, dict(n_samples=5)),
    ("gptq-noact-asym", "qwen2", "gptq", G16A, dict(n_samples=5, act_order=False)),
    ("awq", "llama", "awq", G16A, dict(n_samples=5, n_grid=5, clip_grid=5)),
    ("awq-gemma-fewer-batches", "gemma3_text", "awq", G16A, dict(n_samples=3, max_tokens=80, n_grid=5, clip_grid=5)),
    ("wanda-2of4", "llama", "wanda", None, dict(n_samples=5, pattern="2:4")),
    ("sparsegpt-int4", "qwen2", "sparsegpt", G32, dict(n_samples=5, sparsity=0.5, quantize=True)),
    ("static-int8-smooth", "llama", "static-int8", None, dict(n_samples=3, smooth_alpha=0.5)),
    ("static-int8-moving", "llama", "static-int8", None, dict(n_samples=5, observer="moving-minmax")),
    ("llm-int8", "llama", "llm-int8", None, dict(n_samples=5, threshold=0.5)),
    ("rtn-runner", "llama", "rtn", G32, dict(n_samples=3, force_runner=True)),
    ("hqq", "gemma3_text", "hqq", None, {}),
    ("magnitude-global", "llama", "magnitude", None, dict(sparsity=0.6, scope="global")),
    ("nf4", "qwen2", "nf4", None, {}),
]
# Streamed (blocks read from the files and written one at a time): process 0 alone writes.
STREAMED = [
    ("stream-gptq", "llama", "gptq", G32, dict(n_samples=5)),
    ("stream-awq", "qwen2", "awq", G16A, dict(n_samples=3, n_grid=5, clip_grid=5)),
    ("stream-rtn", "gemma3_text", "rtn", G32, {}),
]


def _state_digest(model: torch.nn.Module, record: dict) -> str:
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(record["method"], sort_keys=False, default=str).encode())
    return h.hexdigest()


def _run_case(case, calib: str, out: Path) -> tuple[str, str | None]:
    _, family, method, scheme, kw = case
    t = tiny_model(family, seed=3)
    m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
    api.quantize(m, method, scheme, calibration_text=calib, seq_len=24, batch_size=2, progress=False, **kw)
    path = api.save(m, str(out))
    return _state_digest(m.model, m.record), (checkpoint_digest(Path(path)) if processes.is_main() else None)


def _any_linear_model() -> tuple[str, str | None]:
    """A model outside the decoder families: its linears are dealt one by one."""
    from lowbit.calibration.sequential import apply_data_free

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.Linear(32, 8), torch.nn.Linear(8, 4))
    meth = make_method("magnitude", sparsity=0.6)
    apply_data_free(net, meth, progress=False)
    return _state_digest(net, {"method": meth.describe()}), None


def _source(root: Path, family: str) -> Path:
    d = root / f"src-{family}"
    if not d.is_dir():
        t = tiny_model(family, seed=3)
        t.model.save_pretrained(str(d), max_shard_size="50KB")
        t.tokenizer.save_pretrained(str(d))
    return d


def _run_streamed(case, calib: str, root: Path, out: Path) -> str | None:
    _, family, method, scheme, kw = case
    m = api.load(str(_source(root, family)), stream=True)
    api.quantize(m, method, scheme, calibration_text=calib, seq_len=24, batch_size=2, progress=False,
                 output=str(out), **kw)
    return checkpoint_digest(out) if processes.is_main() else None


def _worker(rank: int, world: int, port: int, calib: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        got = {case[0]: _run_case(case, calib, Path(out_dir) / case[0]) for case in CASES}
        got["any-linear"] = _any_linear_model()
        for case in STREAMED:
            got[case[0]] = _run_streamed(case, calib, Path(out_dir).parent, Path(out_dir) / case[0])
        # a failure in one process (the owner of the layer with a NaN) stops every process
        t = tiny_model("llama", seed=3)
        with torch.no_grad():
            t.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        m = api.Model(model=t.model, tokenizer=t.tokenizer, name=t.name, source=t.source)
        try:
            api.quantize(m, "gptq", G32, calibration_text=calib, n_samples=3, seq_len=24, batch_size=2,
                         progress=False)
            got["nan"] = "no error"
        except processes.PeerError as e:
            got["nan"] = f"peer: {e}"
        except LowbitError as e:
            got["nan"] = f"own: {e}"
        torch.save(got, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_three_processes_make_what_one_makes(tmp_path):
    import torch.multiprocessing as mp

    calib = _text(tmp_path / "calib.txt")
    (tmp_path / "split").mkdir()
    for case in STREAMED:
        _source(tmp_path, case[1])
    mp.spawn(_worker, args=(3, _free_port(), calib, str(tmp_path / "split")), nprocs=3, join=True)
    ranks = [torch.load(tmp_path / "split" / f"rank{r}.pt", weights_only=False) for r in range(3)]
    for case in CASES:
        state, ckpt = _run_case(case, calib, tmp_path / "single" / case[0])
        assert ranks[0][case[0]] == (state, ckpt), case[0]
        for r in (1, 2):
            assert ranks[r][case[0]] == (state, None), (case[0], r)
    assert all(ranks[r]["any-linear"] == _any_linear_model() for r in range(3))
    for case in STREAMED:
        assert ranks[0][case[0]] == _run_streamed(case, calib, tmp_path, tmp_path / "single" / case[0]), case[0]
        assert [ranks[r][case[0]] for r in (1, 2)] == [None, None]
    owner = [r for r in range(3) if ranks[r]["nan"].startswith("own:")]
    assert len(owner) == 1 and "model.layers.1.mlp.down_proj" in ranks[owner[0]]["nan"]
    for r in set(range(3)) - set(owner):
        assert ranks[r]["nan"].startswith(f"peer: process {owner[0]} of 3 failed:"), ranks[r]["nan"]


# -- torchrun and the command line -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    save_tiny(d / "tiny", "llama", seed=3)
    return d


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_torchrun_two_processes_write_the_one_process_checkpoint(tiny_dir, method):
    from lowbit import cli

    calib = _text(tiny_dir / "calib.txt")
    args = ["quantize", str(tiny_dir / "tiny"), "--method", method, "--group-size", "32", "--calib", calib,
            "--samples", "20", "--seq-len", "32"]  # 3 batches of 8, 8 and 4 samples
    assert cli.main(args + ["-o", str(tiny_dir / f"{method}-1")]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "lowbit.cli", *args,
                           "-o", str(tiny_dir / f"{method}-2")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("lowbit: done in") == 1  # process 0 alone reports
    record = json.loads((tiny_dir / f"{method}-2" / "lowbit.json").read_text())
    if method != "rtn":
        assert record["calibration"]["world_size"] == 2
    assert checkpoint_digest(tiny_dir / f"{method}-2") == checkpoint_digest(tiny_dir / f"{method}-1")


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the strict reproducible mode is MKL's")
def test_reproducible_products_do_not_depend_on_the_thread_count():
    # `--reproducible`: at real sizes a product's sums split differently on 1 and 2 threads (a
    # torchrun process has one); MKL's strict mode makes the bits independent of the count
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "os.environ.pop('MKL_CBWR', None)\n"
        "from lowbit.core.processes import thread_invariant_products\n"
        "assert thread_invariant_products()\n"
        "X = torch.randn(16384, 2048, generator=torch.Generator().manual_seed(0))\n"
        "A = torch.randn(512, 8192, generator=torch.Generator().manual_seed(1))\n"
        "W = torch.randn(2048, 8192, generator=torch.Generator().manual_seed(2))\n"
        "out = []\n"
        "for n in (1, 2, 3):\n"
        "    torch.set_num_threads(n)\n"
        "    out.append((X.T @ X, torch.nn.functional.linear(A, W)))\n"
        "assert all(torch.equal(a, b) for o in out[1:] for a, b in zip(out[0], o)), 'thread-dependent bits'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
