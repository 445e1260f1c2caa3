"""The decode step's thread count, chosen by timing the steps themselves.

A batch-1 decode step is a few dozen small parallel regions (one per linear layer, plus
attention). When another process holds one of the cores, an OpenMP team of 2 waits at every
region's barrier for the thread that is not running, and decoding on 2 threads falls far below
decoding on 1. The load of other processes is not visible in advance (the load average lags by a
minute, and says nothing about which cores), so `ThreadChooser` measures instead: it times a
few steps at each candidate count, interleaved (1, 2, 1, 2, ... so that a change of load during
the probe hits every candidate alike; a candidate whose step takes over ``give_up`` times the
best step so far is not probed further), and runs at the count whose median step was fastest
until the next probe: ``every`` steps later, an interval that doubles (up to ``most_every``)
each time a probe confirms the choice and starts over when it changes; a count given up sits
out the next 1, 2, 4, ... probes, so that probing a slow count costs little when the load stays.
A step at the chosen count that takes over ``give_up`` times that count's median in the last
probe (another process took a core) starts a probe at once, with the interval back at ``every``. Candidates are 1, the powers of two below the
maximum, and the maximum (``torch.get_num_threads()`` when the chooser was made).

Timing alone pays for what it learns: every probe of 2 threads while another process holds a core
costs one very slow step. So the chooser also asks `FreeCores` (when given one; the C decode step
does) how many of this process's CPUs other processes left free over the last quarter second
(/proc/stat's busy time of those CPUs minus this process's own CPU time): counts above the free
cores are neither run nor probed until the load goes away, and the count drops at once when it
appears. Timing still decides among the counts that fit.

The results do not depend on the choice: every native kernel and the decode step give bit-identical
output on any thread count (tests/test_runtime_native.py). A fixed count (``fixed``) turns the
choice off, as benchmarks that compare thread counts need.
"""

from __future__ import annotations

import math
import os
import statistics
import time

__all__ = ["FreeCores", "ThreadChooser"]


class FreeCores:
    """``free()`` -> how many of this process's CPUs (its affinity mask) other processes left idle
    since the previous call, or None (first call, no /proc/stat, or under ``min_interval``
    seconds since the previous reading: too short for /proc/stat's 10 ms ticks).

    busy by others = (busy ticks of those CPUs in /proc/stat: user, nice, system, irq, softirq,
    steal) / ticks per second - this process's own CPU seconds (``os.times``), per wall second;
    free = CPUs - that. A hypervisor's steal counts as busy: that core is not ours either."""

    def __init__(self, min_interval: float = 0.25, stat_path: str = "/proc/stat", clock=time.perf_counter):
        try:
            self.cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            self.cpus = list(range(os.cpu_count() or 1))
        self.names = {f"cpu{c}" for c in self.cpus}
        self.min_interval = min_interval
        self.stat_path = stat_path
        self.clock = clock
        try:
            self.hz = os.sysconf("SC_CLK_TCK")
        except (AttributeError, ValueError, OSError):
            self.hz = 100
        self._last = self._read()

    def _read(self):
        """(wall seconds, busy ticks of our CPUs, own CPU seconds), or None."""
        try:
            with open(self.stat_path) as f:
                busy = 0
                for line in f:
                    if not line.startswith("cpu"):
                        break
                    parts = line.split()
                    if parts[0] in self.names:
                        v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        except (OSError, ValueError, IndexError):
            return None
        t = os.times()
        return self.clock(), busy, t.user + t.system

    def free(self) -> float | None:
        if self._last is None:
            return None
        if self.clock() - self._last[0] < self.min_interval:
            return None
        now = self._read()
        if now is None:
            return None
        prev, self._last = self._last, now
        wall = now[0] - prev[0]
        others = ((now[1] - prev[1]) / self.hz - (now[2] - prev[2])) / wall
        return len(self.cpus) - min(max(others, 0.0), float(len(self.cpus)))


class ThreadChooser:
    """``next()`` -> the thread count for the coming step; ``record(count, seconds)`` after it."""

    def __init__(self, most: int, every: int = 64, probe: int = 3, fixed: int | None = None,
                 most_every: int = 1024, give_up: float = 2.0, free=None):
        if most < 1 or every < 1 or probe < 1 or most_every < every or give_up <= 1:
            raise ValueError("ThreadChooser needs most, every, probe >= 1, most_every >= every, give_up > 1")
        self.most = most
        self.fixed = fixed
        self.every, self.probe = every, probe
        self.most_every, self.give_up = most_every, give_up
        self.interval = every                    # steps between probes: doubles while the choice holds
        counts = {1, most}
        c = 2
        while c < most:
            counts.add(c)
            c *= 2
        self.candidates = tuple(sorted(counts))
        self.current = most                      # the count the last probe chose
        self.free = free                         # () -> free cores or None (FreeCores().free), or None
        self.allowed = most                      # counts above this are not run: cores taken by others
        self.history: list[tuple[int, dict[int, float]]] = []  # (chosen, median seconds per count)
        self._schedule: list[int] = []
        self._times: dict[int, list[float]] = {}
        self._left = 0                           # steps at `current` before the next probe
        self._skip: dict[int, int] = {}          # count -> probes it still sits out
        self._sit_out: dict[int, int] = {}       # count -> probes it sat out after its last give-up
        if len(self.candidates) > 1:
            self._start_probe()

    def _start_probe(self) -> None:
        """The next probe's interleaved schedule. A count given up in earlier probes sits out the
        next 1, 2, 4, ... probes (its skip doubles each time it is given up again), so that a
        persistent load does not cost one very slow step per probe; with only the current count
        left there is nothing to time, and its run simply continues."""
        want = []
        for c in self.candidates:
            if c > self.allowed:
                continue
            if c != self.current and self._skip.get(c, 0) > 0:
                self._skip[c] -= 1
            else:
                want.append(c)
        if len(want) < 2:
            self._left = self.interval
            return
        self._schedule = [c for _ in range(self.probe) for c in want]
        self._times = {c: [] for c in want}

    def next(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self._schedule:
            return self._schedule[0]
        return self.current

    def _check_free(self) -> None:
        """Fit the counts to the cores other processes leave free (when `free` says)."""
        f = self.free() if self.free is not None else None
        if f is None:
            return
        allowed = min(self.most, max(1, math.floor(f + 0.3)))  # 2 CPUs, another process on ~0.7+ of one: 1
        if allowed == self.allowed:
            return
        grew = allowed > self.allowed
        self.allowed = allowed
        if self.current > allowed:
            self.current = max(c for c in self.candidates if c <= allowed)
        if self._schedule:
            self._schedule = [c for c in self._schedule if c <= allowed]
            if len(set(self._schedule)) < 2:     # nothing left to compare: the probe ends here
                self._schedule = []
                self._left = self.every
        if grew:                                 # cores came back: find out at once whether they pay
            self._skip.clear()
            self._sit_out.clear()
            self.interval = self.every
            self._left = 0
            self._start_probe()

    def record(self, count: int, seconds: float) -> None:
        if self.fixed is not None or len(self.candidates) == 1:
            return
        self._record(count, seconds)
        self._check_free()

    def _record(self, count: int, seconds: float) -> None:
        if self._schedule and count == self._schedule[0]:
            self._schedule.pop(0)
            self._times[count].append(seconds)
            others = [min(t) for c, t in self._times.items() if c != count and t]
            if others and seconds > self.give_up * min(others):  # clearly slower: not probed further
                self._schedule = [c for c in self._schedule if c != count]
                self._sit_out[count] = 2 * self._sit_out.get(count, 0) or 1
                self._skip[count] = self._sit_out[count]
            elif len(self._times[count]) == self.probe:
                self._sit_out[count] = 0
            if not self._schedule:               # probe done: the fastest median wins (ties: fewer)
                med = {c: statistics.median(t) for c, t in self._times.items() if t and c <= self.allowed}
                chosen = min(med, key=lambda c: (med[c], c))
                held = bool(self.history) and chosen == self.current
                self.interval = min(2 * self.interval, self.most_every) if held else self.every
                self.current = chosen
                self.history.append((self.current, med))
                del self.history[:-16]
                self._left = self.interval
            return
        self._left -= 1
        ref = self.history[-1][1].get(count) if self.history else None
        if ref is not None and seconds > self.give_up * ref:  # the load changed: probe now
            self.interval = self.every
            self._left = 0
        if self._left <= 0:
            self._start_probe()
