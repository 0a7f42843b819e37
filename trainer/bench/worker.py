"""Benchmark measurements in a fresh process, optionally pinned to N cores.

    python -m trainer.bench.worker JOB_JSON RESULT_JSON

JOB_JSON holds ``{"cores": N or null, "tasks": [[task, args], ...]}``; the tasks run in
order and RESULT_JSON gets their results, in order. The process pins itself to its cores
*before* TensorFlow is imported, so TensorFlow sizes its thread pools for them (it counts
the CPUs it may run on).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

#: task name -> "module:function"; each function takes the args dict and returns a JSON-able dict.
TASKS = {
    "inputs": "trainer.bench.inputs:measure",
    "training": "trainer.bench.training:measure",
    "comms": "trainer.bench.comms:measure",
}


def pin_to_cores(cores: int) -> list[int]:
    """Restrict this process to its first ``cores`` allowed CPUs (before TensorFlow starts)."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:cores]
    os.sched_setaffinity(0, chosen)
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(len(chosen))
    return chosen


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as fh:
        job = json.load(fh)
    cpus = pin_to_cores(int(job["cores"])) if job.get("cores") else None
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = []
    for task, args in job["tasks"]:
        module_name, function_name = TASKS[task].split(":")
        results.append(getattr(importlib.import_module(module_name), function_name)({**args, "cpus": cpus}))
    with open(result_path, "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
