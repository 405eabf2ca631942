"""Thread counts: host facts, $PIXLOCAL_THREADS, and the decode policy that survives a busy
core (kernels/threads.py), driven with simulated step times."""

from __future__ import annotations

import pytest

from pixlocal import host
from pixlocal.errors import ConfigError
from pixlocal.kernels import threads as th


def test_parse_cpuinfo_counts_physical_cores():
    text = ("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2\nphysical id\t: 0\n"
            "core id\t\t: 0\n\nprocessor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu avx2\n"
            "physical id\t: 0\ncore id\t\t: 0\n\nprocessor\t: 2\nphysical id\t: 0\n"
            "core id\t\t: 1\n")
    c = host.parse_cpuinfo(text)
    assert c.model == "Test CPU" and c.physical_cores == 2 and "avx2" in c.flags


def test_cgroup_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert host.cgroup_cpus(str(tmp_path)) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpus(str(tmp_path)) is None
    assert host.cgroup_cpus(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_bad_pixlocal_threads_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("PIXLOCAL_THREADS", value)
    with pytest.raises(ConfigError, match="PIXLOCAL_THREADS"):
        host.requested_threads()
    with pytest.raises(ConfigError):
        th.ThreadPolicy()


def test_fixed_counts(monkeypatch):
    import numba
    import torch

    monkeypatch.setenv("PIXLOCAL_THREADS", "1")
    p = th.ThreadPolicy()
    assert (p.most, p.adaptive) == (1, False)
    with p.step():
        assert numba.get_num_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv("PIXLOCAL_THREADS")
    assert not th.ThreadPolicy(threads=1).adaptive
    with pytest.raises(ConfigError):
        th.ThreadPolicy(threads=0)
    auto = th.ThreadPolicy()
    assert auto.most == host.usable_cores() and auto.n == auto.most
    monkeypatch.setattr(th, "busy_cores", lambda: 0)  # a quiet machine at the first use
    auto.use()
    assert numba.get_num_threads() == min(auto.most, numba.config.NUMBA_NUM_THREADS)


def test_candidates():
    assert th.candidates(1) == [1]
    assert th.candidates(2) == [2, 1]
    assert th.candidates(8) == [8, 7, 4, 1]


def drive(p: th.ThreadPolicy, cost, steps: int, monkeypatch) -> list[int]:
    """Run `steps` decode steps whose time is cost(threads); the counts used, in order."""
    clock = [0.0]
    monkeypatch.setattr(th.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(th, "apply_threads", lambda n: n)
    used = []
    for _ in range(steps):
        n = p.current()
        used.append(n)
        with p.step():
            clock[0] += cost(n)
    return used


def policy(most: int) -> th.ThreadPolicy:
    p = th.ThreadPolicy(threads=most)  # a fixed count, then made adaptive for the test
    p.adaptive, p.arms = True, th.candidates(most)
    p.due = {a: 0.0 for a in p.arms}
    p.fails = {a: 0 for a in p.arms}
    return p


def test_quiet_machine_keeps_all_cores_and_probing_stays_cheap(monkeypatch):
    p = policy(2)
    cost = {2: 0.010, 1: 0.014}.get  # two threads faster, as on a quiet machine
    used = drive(p, cost, 2000, monkeypatch)
    assert used[-1] == 2 and p.n == 2
    spent = sum(cost(n) for n in used)
    assert spent < 1.01 * 2000 * 0.010  # probes of 1 thread cost under 1%


def test_busy_core_switches_to_one_thread_and_bounds_probe_cost(monkeypatch):
    p = policy(2)
    cost = {2: 0.150, 1: 0.0012}.get  # a barrier waiting on a descheduled thread
    used = drive(p, cost, 5000, monkeypatch)
    assert used.index(1) <= 4 and p.n == 1
    spent = sum(cost(n) for n in used[10:])
    assert spent < 1.05 * (len(used) - 10) * 0.0012  # the budget bounds later probes


def test_change_of_load_is_followed_both_ways(monkeypatch):
    p = policy(2)
    phase = ["quiet"]
    table = {"quiet": {2: 0.010, 1: 0.014}, "busy": {2: 0.200, 1: 0.015}}
    drive(p, lambda n: table[phase[0]][n], 200, monkeypatch)
    assert p.n == 2
    phase[0] = "busy"  # another program starts: the slowdown re-opens probing at once
    used = drive(p, lambda n: table[phase[0]][n], 20, monkeypatch)
    assert p.n == 1 and used.count(2) <= 4
    phase[0] = "quiet"  # it ends: a later probe finds two threads faster again
    drive(p, lambda n: table[phase[0]][n], 3000, monkeypatch)
    assert p.n == 2


def test_eight_cores_with_one_busy_pick_seven(monkeypatch):
    p = policy(8)
    cost = {8: 0.05, 7: 0.006, 4: 0.008, 1: 0.02}.get
    drive(p, cost, 300, monkeypatch)
    assert p.n == 7


def test_first_count_leaves_out_cores_others_keep_busy(monkeypatch):
    def look(own_seconds):
        samples = iter([{0: (100, 1000), 1: (100, 1000)},  # cpu 0 idle, cpu 1 busy, 50 ms on:
                        {0: (150, 1050), 1: (105, 1050)}])
        clock = iter([0.0, own_seconds])
        monkeypatch.setattr(th, "_cpu_times", lambda: next(samples))
        monkeypatch.setattr(th.time, "process_time", lambda: next(clock))
        return th.busy_cores(0.05)

    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(th.time, "sleep", lambda s: None)
    assert look(0.0) == 1  # another program on cpu 1
    assert look(0.047) == 0  # our own spinning worker on cpu 1
    p = policy(2)
    p._looked = False
    monkeypatch.setattr(th, "busy_cores", lambda: 1)
    monkeypatch.setattr(th, "apply_threads", lambda n: n)
    assert p.use() == 1 and p.n == 1


def test_busy_cores_reads_this_machine():
    assert 0 <= th.busy_cores(0.01) <= host.usable_cores() or th._cpu_times() == {}


def test_a_quiet_first_look_delays_the_first_probe(monkeypatch):
    p = policy(2)
    p._looked = False
    monkeypatch.setattr(th, "busy_cores", lambda: 0)
    used = drive(p, {2: 0.010, 1: 0.014}.get, 300, monkeypatch)
    assert 1 not in used[:p.QUIET_GAP] and 1 in used  # probed later, not at once
    p = policy(2)
    p._looked = False
    monkeypatch.setattr(th, "busy_cores", lambda: 1)  # started on 1 thread: 2 is tried soon
    used = drive(p, {2: 0.010, 1: 0.014}.get, 60, monkeypatch)
    assert used[1] == 1 and used[-1] == 2  # (used[0] was read before the first look)
