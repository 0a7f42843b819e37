"""Real `trainer train` processes: epoch times with and without the feature cache, seconds
from process start to the first training step, and peak resident memory per worker.

Each worker is the installed entrypoint (what a pod runs), started here directly so that
its own output and its own resource usage can be watched:
- the first training step ends when Keras' progress bar first prints ``1/N [`` (the runs
  use ``runtime.verbose=1``, which writes after every step); the output is read unbuffered
  and time-stamped as it arrives;
- peak resident memory is the kernel's ``ru_maxrss`` for that process (``os.wait4``);
- epoch times are the differences between the epoch-end timestamps of ``metrics.jsonl``
  (training, validation and callbacks included).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field

from trainer.config import set_args
from trainer.contract import Env
from trainer.launch import entrypoint_command, free_ports, worker_env
from trainer.supervisor import Child

FIRST_STEP = re.compile(rb"(?:^|[\r\n\x08])\s*1/\d+ \[")
_CACHE_LOG = re.compile(  # the feature cache's log line (trainer.train.feature_cache)
    r"feature cache: (\d+) training (?:records \([^)]*\) )?and \d+ validation images through the frozen "
    r"[\w ]+? in ([\d.]+) s"
)


@dataclass
class Worker:
    child: Child
    log_path: str
    first_step_at: list[float] = field(default_factory=list)  # wall time of the first step's progress bar


class _FirstStepWatch:
    """Stamps the moment the output first shows ``1/N [`` (raw chunks: the bar is redrawn with \r and \b)."""

    def __init__(self, stamps: list[float]):
        self.stamps, self._tail = stamps, b""

    def __call__(self, chunk: bytes) -> None:
        if not self.stamps and FIRST_STEP.search(self._tail + chunk):
            self.stamps.append(time.time())
        self._tail = chunk[-64:]


def start_worker(settings: list[str], log_path: str, env: dict[str, str]) -> Worker:
    env = {**env, "PYTHONUNBUFFERED": "1", Env.METRICS_PORT.value: "0"}  # metrics endpoint: any free port
    stamps: list[float] = []
    argv = [*entrypoint_command(), "train", *set_args(*settings)]
    child = Child(argv, env=env, on_chunk=_FirstStepWatch(stamps), log_path=log_path)
    return Worker(child, log_path, stamps)


def finish(worker: Worker, timeout: float) -> dict:
    """Wait for the worker (killed past ``timeout``); its exit code, start-up time and peak memory."""
    code = worker.child.wait(timeout)
    ended = time.time()
    worker.child.join_output(timeout=10)
    started = worker.child.started_wall
    first = worker.first_step_at[0] if worker.first_step_at else None
    return {
        "exit_code": code,
        "seconds_to_first_step": round(first - started, 2) if first else None,
        "peak_rss_mb": round(worker.child.rusage.ru_maxrss / 1024, 1),  # Linux reports kilobytes
        "wall_seconds": round(ended - started, 2),
        "log": worker.log_path,
    }


def single_worker(settings: list[str], log_path: str) -> Worker:
    env = dict(os.environ)
    env.pop(Env.TF_CONFIG.value, None)
    return start_worker(settings, log_path, env)


def multi_worker(settings: list[str], log_prefix: str, workers: int) -> list[Worker]:
    addresses = [f"localhost:{port}" for port in free_ports(workers)]
    return [
        start_worker(settings, f"{log_prefix}-{index}.log", worker_env(addresses, index)) for index in range(workers)
    ]


def epoch_seconds(output_dir: str, phase: str) -> list[float]:
    """Wall seconds of every epoch after the first (epoch-end timestamp differences)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        ends = [row["time"] for row in map(json.loads, fh) if row["phase"] == phase]
    return [round(b - a, 3) for a, b in itertools.pairwise(ends)]


def extraction_seconds(log_path: str) -> float | None:
    with open(log_path, errors="replace") as fh:
        found = _CACHE_LOG.search(fh.read())
    return float(found.group(2)) if found else None


def require_success(result: dict, what: str) -> None:
    if result["exit_code"] != 0:
        with open(result["log"], errors="replace") as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"{what} failed with exit code {result['exit_code']}; log {result['log']}:\n{tail}")
