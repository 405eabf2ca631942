"""Thread counts that stay fast on a busy machine: measured while decoding, not guessed.

A decode step is a few dozen fork-join regions of ~50-500 us each. Split over every core,
each region ends when the slowest thread does; when another program holds one of the cores,
that thread waits for a scheduler slice (milliseconds) at every region, and OpenMP's
spinning waiters make it worse: on a 2-core VM with one core busy, the tiny model fell from
~1,000 to 6 tok/s with 2 threads, while 1 thread ran 819 (issue 20). Neither the load average
nor /proc/stat says reliably whether the other core is free *now*, so ThreadPolicy measures:
it times each decode step at the current count and, now and then, a short probe at another
count (all cores, one fewer, half, one), and keeps whichever ran faster. Probes that lose
back off so that their cost stays under `budget` (2%) of the decode time; a sudden slowdown (a
program starting) re-opens probing at once.

Before the first decode step there is nothing to time, and a prefill split over a core that
another program holds waits at every region just the same (a tiny model's 1,113-token prefill
took 1.7 s on 2 threads against 0.2 s on 1, with the other core busy). So the first count
comes from a 50 ms look at /proc/stat: the cores' worth of time that other programs used on
the cores this process may use (its own threads' time taken off) is left out.

A count the user fixed (`threads=` / --threads / $PIXLOCAL_THREADS) is used as given.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import torch

from ..host import requested_threads, usable_cores


def apply_threads(n: int) -> int:
    """Set numba's (this thread's) and torch's thread counts to n (capped at numba's pool)."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _cpu_times() -> dict[int, tuple[int, int]]:
    """cpu index -> (idle jiffies, total jiffies) from /proc/stat ({} where unreadable)."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    v = [int(x) for x in vals[:8]]
                    out[int(name[3:])] = (v[3] + v[4], sum(v))
    except (OSError, ValueError, IndexError):
        return {}
    return out


def busy_cores(window: float = 0.05) -> int:
    """Cores of this process's affinity that other programs kept busy over a `window`-second
    look, rounded; 0 where unknown. This process's own threads (OpenMP workers still
    spinning after the load's last parallel region, say) are not others: their CPU time is
    taken off the total."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    a, own = _cpu_times(), time.process_time()
    time.sleep(window)
    b, own = _cpu_times(), time.process_time() - own
    used = 0.0  # cores' worth of busy time over the window, all programs
    for cpu, (idle1, tot1) in b.items():
        if cpu in a and (allowed is None or cpu in allowed) and tot1 > a[cpu][1]:
            used += 1 - (idle1 - a[cpu][0]) / (tot1 - a[cpu][1])
    return max(0, round(used - own / window))


def candidates(most: int) -> list[int]:
    """Thread counts worth trying with `most` cores: all, one fewer (one core taken by
    another program), half, one."""
    return sorted({most, max(1, most - 1), max(1, most // 2), 1}, reverse=True)


class ThreadPolicy:
    """Chooses the thread count for each decode step (`with policy.step(): ...`)."""

    PROBE = 3  # steps per probe; the first may include waking threads, so it is not scored
    MIN_GAP = 16  # steps at the current count between probes of the same other count
    SHOCK = 1.6  # a step this much slower than the recent median (twice in a row) re-probes
    WIN = 0.97  # a probe must be 3% faster to switch
    QUIET_GAP = 128  # steps before the first probe when the first look saw no busy core

    def __init__(self, threads: int | None = None, *, budget: float = 0.02):
        fixed = requested_threads(threads)
        self.most = fixed or usable_cores()
        self.adaptive = fixed is None and self.most > 1
        self.budget = budget
        self.n = self.most  # the current choice
        self.arms = candidates(self.most) if self.adaptive else [self.most]
        self.recent: deque[float] = deque(maxlen=5)  # step seconds at self.n
        self.elapsed = 0.0  # decode seconds so far
        self.due = {a: 0.0 for a in self.arms}  # elapsed at which arm a may be probed
        self.fails = {a: 0 for a in self.arms}
        self.probe: tuple[int, list[float]] | None = None
        self._set = 0
        self.switches = 0
        self._looked = not self.adaptive  # the first use() looks at the other programs
        self._start_gap = 0  # steps before the first probe (set by the first look)

    def _first_look(self) -> None:
        self._looked = True
        busy = busy_cores()
        n = max(1, self.most - busy)
        self.n = min(self.arms, key=lambda a: abs(a - n))  # the nearest candidate
        # A quiet look makes the first probe wait longer: each costs ~2% of a 128-token
        # answer on a quiet machine, and a program that starts later trips the SHOCK rule.
        self._start_gap = self.QUIET_GAP if busy == 0 else self.MIN_GAP

    def current(self) -> int:
        """The count the next step runs on (set it for prefill and other work too)."""
        return self.probe[0] if self.probe else self.n

    def use(self) -> int:
        """Apply the current count (numba's is per calling thread): returns it."""
        if not self._looked:
            self._first_look()
        n = self.current()
        if n != self._set or numba.get_num_threads() != n:
            self._set = apply_threads(n)
        return n

    @contextmanager
    def step(self) -> Iterator[None]:
        """Time one decode step at the current count and learn from it."""
        self.use()
        t0 = time.perf_counter()
        yield
        if self.adaptive:
            self._learn(time.perf_counter() - t0)

    def _learn(self, dt: float) -> None:
        self.elapsed += dt
        if self.probe is not None:
            arm, got = self.probe
            got.append(dt)
            ref = statistics.median(self.recent) if self.recent else dt
            if (len(got) == 1 and dt > 4 * ref) or (len(got) == 2 and dt > 1.1 * ref):
                self._lost(arm, got, ref)  # clearly slower: stop early
            elif len(got) == self.PROBE:
                if statistics.median(got[1:]) < self.WIN * ref:
                    self.n, self.probe = arm, None
                    self.recent = deque(got[1:], maxlen=self.recent.maxlen)
                    self.switches += 1
                    for a in self.arms:  # others are re-probed from the new count
                        self.fails[a] = 0
                        self.due[a] = self.elapsed + self.MIN_GAP * ref
                else:
                    self._lost(arm, got, ref)
            return
        r = self.recent
        if len(r) >= 3 and dt > self.SHOCK * statistics.median(r) and r[-1] > self.SHOCK * \
                statistics.median(list(r)[:-1]):
            r.clear()  # the machine changed: the old times say nothing now
            for a in self.arms:
                self.fails[a], self.due[a] = 0, self.elapsed
        r.append(dt)
        if len(r) < 3:
            return
        if self._start_gap:
            gap, self._start_gap = self._start_gap * statistics.median(r), 0
            self.due = {a: max(d, self.elapsed + gap) for a, d in self.due.items()}
        for a in self.arms:
            if a != self.n and self.elapsed >= self.due[a]:
                self.probe = (a, [])
                return

    def _lost(self, arm: int, got: list[float], ref: float) -> None:
        """A probe that did not win: wait long enough that probing costs at most `budget`."""
        self.probe = None
        cost = max(0.0, sum(got) - ref * len(got))
        self.fails[arm] += 1
        gap = max(self.MIN_GAP * ref, cost / self.budget) * 2 ** min(self.fails[arm] - 1, 5)
        self.due[arm] = self.elapsed + gap
