"""The decode step's thread chooser (lowbit.runtime.threads): interleaved probes, the fastest
median wins, re-probing follows a change of load, a fixed count pins it; and a native step that
switches thread counts gives the same logits as one that does not."""

import pytest
import torch

from lowbit.runtime.threads import FreeCores, ThreadChooser


def drive(ch: ThreadChooser, cost, steps: int) -> list[int]:
    """Run ``steps`` steps with step time cost(count, i); the counts used."""
    used = []
    for i in range(steps):
        n = ch.next()
        used.append(n)
        ch.record(n, cost(n, i))
    return used


def test_candidates_and_interleaved_probe():
    assert ThreadChooser(1).candidates == (1,)
    assert ThreadChooser(2).candidates == (1, 2)
    assert ThreadChooser(8).candidates == (1, 2, 4, 8)
    assert ThreadChooser(6).candidates == (1, 2, 4, 6)
    ch = ThreadChooser(2, every=10, probe=3)
    used = drive(ch, lambda n, i: 1.0 / n, 6)
    assert used == [1, 2, 1, 2, 1, 2]                        # interleaved, so a load change hits both
    assert ch.current == 2 and ch.history[-1][1] == {1: 1.0, 2: 0.5}


def test_follows_a_change_of_load():
    ch = ThreadChooser(2, every=20, probe=3)
    # quiet machine: 2 threads twice as fast; then a competing process makes 2 threads slow
    used = drive(ch, lambda n, i: (1.0 / n) if i < 40 else (1.0 if n == 1 else 5.0), 400)
    assert used[6:26] == [2] * 20                            # after the first probe
    assert ch.history[0][0] == 2 and ch.history[-1][0] == 1 and ch.current == 1
    first_one = next(i for i in range(40, 400) if used[i:i + 20] == [1] * 20)
    assert first_one < 120                                   # the next probe saw the load
    assert used[first_one:].count(2) <= len(ch.history)      # a slow count is tried once per probe
    assert ch.history[-1][1] == {1: 1.0, 2: 5.0}             # and given up after one step


def test_probes_grow_sparse_while_the_choice_holds():
    ch = ThreadChooser(2, every=16, probe=3, most_every=128)
    used = drive(ch, lambda n, i: 1.0 / n, 2000)
    assert ch.interval == 128 and set(c for c, _ in ch.history) == {2}
    assert used.count(1) < 2000 * 0.03                       # the slower count: probes only


def test_free_cores_drop_the_count_at_once_and_give_it_back():
    """With the free-core reading, a competing process takes the team down to 1 thread at the next
    reading (no slow 2-thread probe step is ever run while it lasts); when the core frees up, a
    probe runs at once and 2 threads come back."""
    state = {"i": 0}

    def free():  # a reading every 10 steps; another process busy on a core for steps 100..299
        i = state["i"]
        if i % 10:
            return None
        return 1.05 if 100 <= i < 300 else 1.95

    def cost(n, i):
        state["i"] = i + 1
        busy = 100 <= i < 300
        return (1.0 if n == 1 else 20.0) if busy else 1.0 / n

    ch = ThreadChooser(2, every=16, probe=3, free=free)
    used = drive(ch, cost, 500)
    assert used[60:100].count(2) >= 34                       # quiet: 2 threads (and a periodic probe)
    assert set(used[100:300]) == {1}                         # busy: never 2, not even to probe
    assert used[300:320].count(2) >= 10 and used[320:500].count(1) < 20  # freed: probed at once, 2 again
    assert ch.allowed == 2 and ch.current == 2


def test_free_cores_reads_proc_stat(tmp_path):
    """free = CPUs - (busy ticks / Hz - own CPU seconds) / wall seconds, on a fake /proc/stat."""
    import os

    stat = tmp_path / "stat"
    clock = {"t": 0.0}
    fc = FreeCores(min_interval=0.25, stat_path=str(stat), clock=lambda: clock["t"])
    assert fc._last is None and fc.free() is None            # no file yet: no reading

    def write(busy_per_cpu):
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for c in fc.cpus:
            lines.append(f"cpu{c} {busy_per_cpu} 0 0 1000 0 0 0 0 0 0")
        stat.write_text("\n".join(lines + ["intr 0"]) + "\n")

    write(0)
    fc._last = fc._read()
    own0 = fc._last[2]
    clock["t"] = 0.1
    assert fc.free() is None                                 # under min_interval: no reading
    clock["t"] = 1.0
    write(int(fc.hz * 1.0 / len(fc.cpus)) if len(fc.cpus) else 0)  # one CPU-second of busy ticks over the CPUs
    f = fc.free()
    own = fc._last[2] - own0
    expect = len(fc.cpus) - max(0.0, min(float(len(fc.cpus)), (len(fc.cpus) * int(fc.hz / len(fc.cpus)) / fc.hz) - own))
    assert f == pytest.approx(expect, abs=1e-9)
    assert len(fc.cpus) == len(os.sched_getaffinity(0))


def test_ties_keep_fewer_threads_and_fixed_pins():
    ch = ThreadChooser(4, every=5, probe=2)
    drive(ch, lambda n, i: 1.0, 8)
    assert ch.current == 1
    pinned = ThreadChooser(4, fixed=3)
    assert drive(pinned, lambda n, i: 1.0 / n, 30) == [3] * 30 and pinned.history == []
    with pytest.raises(ValueError):
        ThreadChooser(0)


def test_native_step_switching_threads_gives_the_same_logits():
    from lowbit import api
    from lowbit.core.scheme import QuantScheme
    from lowbit.kernels import cpu
    from lowbit.models.tiny import tiny_model
    from lowbit.runtime import LeanDecoder
    from lowbit.runtime.native import _library

    if _library() is None or not cpu.available():
        pytest.skip("native kernels not built")
    lm = tiny_model("llama", seed=9)
    m = api.Model(model=lm.model, tokenizer=lm.tokenizer, name=lm.name, source=lm.source)
    api.quantize(m, "rtn", QuantScheme(bits=4, symmetric=False, group_size=32), progress=False)

    class Alternating(ThreadChooser):
        """1, 2, 1, 2, ... threads whatever the timings say (a loaded machine makes the timing
        chooser stay on one count: this test is about the logits when the count changes)."""

        def __init__(self):
            super().__init__(2)
            self.used = []

        def next(self) -> int:
            self.used.append(1 + len(self.used) % 2)
            return self.used[-1]

        def record(self, count: int, seconds: float) -> None:
            pass

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = []
        for chooser in (Alternating(), ThreadChooser(2, fixed=1), ThreadChooser(2, fixed=2)):
            dec = LeanDecoder(m.model, max_len=40, native=True)
            dec.native_step.threads = chooser
            dec.forward(torch.arange(5))
            outs.append(torch.stack([dec.forward([i]) for i in range(3, 30)]))
            if isinstance(chooser, Alternating):
                assert len(chooser.used) >= 27 and set(chooser.used) == {1, 2}
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_a_count_given_up_sits_out_more_and_more_probes():
    ch = ThreadChooser(2, every=4, probe=3, most_every=4)  # a probe every 4 steps
    used = drive(ch, lambda n, i: 1.0 if n == 1 else 5.0, 400)
    tries = [i for i, n in enumerate(used) if n == 2]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(tries) <= 8 and all(g2 > g1 for g1, g2 in zip(gaps, gaps[1:]))  # exponentially rarer
    # the load goes away: 2 threads are tried again and win
    ch2 = ThreadChooser(2, every=4, probe=3, most_every=4)
    used2 = drive(ch2, lambda n, i: (1.0 if n == 1 else 5.0) if i < 60 else 1.0 / n, 400)
    assert used2[-40:].count(2) >= 24 and ch2.current == 2     # (1 thread: its probe steps only)


def test_a_sudden_load_triggers_a_probe_at_once():
    ch = ThreadChooser(2, every=16, probe=3, most_every=1024)
    used = drive(ch, lambda n, i: (1.0 / n) if i < 600 else (1.0 if n == 1 else 50.0), 700)
    assert ch.interval > 256 or any(c == 1 for c, _ in ch.history)  # the quiet part grew the interval
    assert used[600:].count(2) <= 3 and used[-20:] == [1] * 20      # one slow step, a probe, then 1 thread
