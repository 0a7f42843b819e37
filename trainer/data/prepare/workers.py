"""The worker processes of `trainer prepare`, and its progress lines.

Checking and encoding images is CPU work, so it runs in a pool of processes (one per usable CPU,
``prepare.processes``), or in this process when one is enough. The pool forks while that is safe
and spawns once TensorFlow runs here; each worker starts with the default SIGTERM
(trainer.signals.reset_in_worker), since the pool stops its workers with SIGTERM.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from trainer.signals import reset_in_worker

T = TypeVar("T")
#: Where progress lines go (stderr unless the caller says otherwise).
Progress = Callable[[str], None]
#: Seconds between two progress lines.
_PROGRESS_SECONDS = 2.0


class Workers:
    """A process pool, or this process alone when one worker is enough (a pool of one is only overhead)."""

    def __init__(self, pool: Any, workers: int) -> None:
        self._pool = pool
        self.workers = workers

    def map_unordered(self, fn: Callable[[Any], T], items: Sequence[Any]) -> Iterator[T]:
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap_unordered(fn, items, self._chunksize(len(items)))

    def map_ordered(self, fn: Callable[[Any], T], items: Sequence[Any]) -> Iterator[T]:
        if self._pool is None:
            return map(fn, items)
        return self._pool.imap(fn, items, self._chunksize(len(items)))

    def _chunksize(self, jobs: int) -> int:
        # Big enough to amortise inter-process overhead, small enough to balance the load.
        return max(1, min(64, jobs // (self.workers * 8)))


@contextlib.contextmanager
def worker_pool(processes: int, jobs: int) -> Iterator[Workers]:
    workers = min(processes or _usable_cpus(), max(jobs, 1))
    if workers <= 1:
        yield Workers(None, 1)
        return
    with multiprocessing.get_context(_start_method()).Pool(workers, initializer=reset_in_worker) as pool:
        yield Workers(pool, workers)


def _usable_cpus() -> int:
    # The CPUs this process may run on (a container's cpuset), not every core of the host.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_method() -> str:
    """fork while it is safe, spawn once TensorFlow runs in this process.

    fork is fast and works from scripts without an ``if __name__ == "__main__"`` guard, but
    it would copy TensorFlow's threads in an undefined state; spawned workers import only
    trainer.data.prepare and PIL (they need the guard in the calling script).
    """
    return "spawn" if "tensorflow" in sys.modules else "fork"


@dataclass
class Meter:
    """Reports ``done/total`` every 2 seconds; quick runs (under 2 s) stay quiet."""

    verb: str
    total: int
    say: Progress
    started: float = field(default_factory=time.monotonic)
    last_time: float = field(default_factory=time.monotonic)

    def update(self, done: int) -> None:
        now = time.monotonic()
        finished_slowly = done == self.total and now - self.started >= _PROGRESS_SECONDS
        if now - self.last_time >= _PROGRESS_SECONDS or finished_slowly:
            self.last_time = now
            rate = done / max(now - self.started, 1e-9)
            self.say(f"{self.verb} {done}/{self.total} images ({100 * done // max(self.total, 1)}%), {rate:.0f} img/s")
