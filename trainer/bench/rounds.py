"""Alternating rounds, the load around each measurement, and ratios with their spread.

A ratio A/B is only as good as the conditions its two sides ran under. Each round measures
every side once, close together in time and in a rotated order, so a slow drift of the machine
hits both sides of a ratio alike; the ratio is the median of the per-round ratios, with their
min-max spread.

The busy rule. Around every measurement the CPU accounting of the CPUs the measuring process
may run on (``os.sched_getaffinity``) is read from ``/proc/stat``, and the process's own CPU time
from ``time.process_time`` (all its threads). Over the measurement:

    other cores = (non-idle CPU time of those CPUs - this process's CPU time) / wall time

(steal time counts as non-idle: a hypervisor that takes the CPU away is load too). A measurement
is **marked busy** when other processes used more than ``BUSY_OTHER_CORES`` cores on average, or
when the process was given fewer CPUs than it asked for. A ratio from a round counts only when
both of its sides are unmarked. Own CPU time below the core count is *not* a mark: a serial stage
(Keras' ImageDataGenerator is one Python thread) legitimately uses one core of two.

Everything here but :func:`cpu_snapshot` is arithmetic on numbers handed in, so it is
unit-tested with synthetic timings.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

#: Other processes' average use of the measured CPUs above which a measurement is marked busy.
#: A quarter of a core: on 2 cores an eighth of the machine, enough to move a ratio by more than
#: the 5% the tightest goal allows.
BUSY_OTHER_CORES = 0.25
#: At least this many unmarked rounds make a ratio that may count toward a goal (full mode).
MIN_ROUNDS = 5
#: More than this share of marked measurements makes a whole run "busy" (trainer bench won't overwrite).
MAX_BUSY_SHARE = 1 / 3
#: The start-of-run probe: how long to watch the machine before deciding it is quiet.
PROBE_SECONDS = 1.0

_IDLE_FIELDS = (3, 4)  # idle, iowait (the columns after "cpuN" in /proc/stat)
_COUNTED_FIELDS = 8  # user nice system idle iowait irq softirq steal; guest time is inside user


def cpu_snapshot(cpus: Sequence[int] | None = None) -> dict:
    """The kernel's CPU accounting of ``cpus`` (default: this process's CPUs) and this process's CPU time."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    busy = total = 0
    with open("/proc/stat") as fh:
        for line in fh:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                continue
            ticks = [int(f) for f in fields[:_COUNTED_FIELDS]]
            total += sum(ticks)
            busy += sum(ticks) - sum(ticks[i] for i in _IDLE_FIELDS)
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "wall": time.perf_counter(),
        "own_cpu": time.process_time(),
        "cpus": len(cpus),
        "machine_busy_cpu": busy / hz,
        "machine_total_cpu": total / hz,
    }


def cpu_snapshot_with_children() -> dict:
    """As :func:`cpu_snapshot`, with the CPU time of this process's finished (waited-for) children
    counted as its own: the load around a stage that runs subprocesses."""
    snapshot = cpu_snapshot()
    times = os.times()
    return {**snapshot, "own_cpu": snapshot["own_cpu"] + times.children_user + times.children_system}


def load_between(before: dict, after: dict, cores_wanted: int | None = None) -> dict:
    """The load over one measurement, from two snapshots: own and other processes' cores, and the mark."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    own = (after["own_cpu"] - before["own_cpu"]) / wall
    machine = (after["machine_busy_cpu"] - before["machine_busy_cpu"]) / wall
    # The kernel counts in clock ticks (1/100 s): over a short measurement its figure and the
    # process's own can differ by a tick, so "others" never goes below zero.
    other = max(0.0, machine - own)
    short = cores_wanted is not None and after["cpus"] < cores_wanted
    return {
        "wall_seconds": round(wall, 3),
        "own_cores": round(own, 3),
        "other_cores": round(other, 3),
        "cpus": after["cpus"],
        "busy": other > BUSY_OTHER_CORES or short,
    }


def measured(run: Callable[[], dict], cores_wanted: int | None = None, snapshot=cpu_snapshot) -> dict:
    """``run()``'s result with the load it ran under (key ``load``)."""
    before = snapshot()
    sample = run()
    return {**sample, "load": load_between(before, snapshot(), cores_wanted)}


def run_rounds(
    measure: Callable[[str], dict], sides: Sequence[str], min_clean: int, max_rounds: int
) -> dict[str, list[dict]]:
    """Rounds of one ``measure(side)`` per side, in a rotated order, until ``min_clean`` rounds had no
    busy measurement or ``max_rounds`` ran: a busy machine costs time, not figures."""
    samples: dict[str, list[dict]] = {side: [] for side in sides}
    clean = 0
    for index in range(max_rounds):
        shift = index % len(sides)
        for side in [*sides[shift:], *sides[:shift]]:
            samples[side].append(measure(side))
        clean += not any(samples[side][-1]["load"]["busy"] for side in sides)
        if clean >= min_clean:
            break
    return samples


def ratio(numerator: list[dict], denominator: list[dict], key: str, min_rounds: int) -> dict:
    """Median and min-max spread of the per-round ratios ``numerator[key] / denominator[key]`` over
    rounds where neither side was busy; ``median`` is None when fewer than ``min_rounds`` such rounds."""
    per_round = [
        {"ratio": round(a[key] / b[key], 4), "busy": a["load"]["busy"] or b["load"]["busy"]}
        for a, b in zip(numerator, denominator, strict=True)
    ]
    clean = [r["ratio"] for r in per_round if not r["busy"]]
    enough = len(clean) >= min_rounds and bool(clean)
    return {
        "median": round(statistics.median(clean), 3) if enough else None,
        "min": round(min(clean), 3) if clean else None,
        "max": round(max(clean), 3) if clean else None,
        "kind": "rounds",
        "rounds": len(per_round),
        "rounds_busy": len(per_round) - len(clean),
        "per_round": per_round,
    }


def single(value: float | None, load: dict) -> dict:
    """A figure from one run (not rounds), in the shape of :func:`ratio`: no spread, void when busy."""
    busy = load["busy"]
    return {
        "median": None if busy else value,
        "min": None,
        "max": None,
        "kind": "one run",
        "rounds": 1,
        "rounds_busy": int(busy),
    }


def median_of(samples: list[dict], key: str) -> float | None:
    """Median of ``key`` over unmarked samples (None when all were busy)."""
    values = [s[key] for s in samples if not s["load"]["busy"]]
    return statistics.median(values) if values else None


def busy_share(samples: dict[str, list[dict]]) -> tuple[int, int]:
    """(marked, all) measurements of a set of rounds."""
    flat = [s for side in samples.values() for s in side]
    return sum(s["load"]["busy"] for s in flat), len(flat)


def probe_machine(seconds: float = PROBE_SECONDS, cpus: Sequence[int] | None = None) -> dict:
    """Other processes' load while this (sleeping) process watches: is the machine quiet to start with?"""
    return measured(lambda: time.sleep(seconds) or {}, snapshot=lambda: cpu_snapshot(cpus))["load"]
