"""`trainer plan` against measured runs: its predicted training seconds for a CPU run on this
machine, 1 worker (`trainer train`) and 2 local workers (`trainer launch --workers 2`).

The method of tests/test_estimate.py's check, on the bench's own prepared dataset: a probe
(`trainer plan --gpu cpu --probe --local --workers N --json`) just before the real run and one
just after (the load that slows the run slows the probes around it); the prediction is the mean of
the two, epoch by epoch, each phase's first epoch with its tracing; the measurement is the sum of
the run's per-epoch ``train_seconds`` (metrics.jsonl). The figure is predicted / measured, one run
per worker count (no spread), marked busy when other processes used the cores during the probes or
the run (children's CPU time counted as own); the goal is a band: within 25% (0.75 to 1.25).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable

from trainer.bench import rounds
from trainer.bench.accuracy import run_step
from trainer.config import set_args
from trainer.launch import entrypoint_command

#: tests/test_estimate.py's CHECKED_RUN (tests/support/training.py's TINY_RUN, 8 steps per epoch),
#: at 8 images per replica (the test's 4 on tiny 40x40 images) so that an epoch is well above timer noise.
CHECKED_RUN = [
    "recipe=transfer",
    "model.weights=none",
    "model.head.dense_units=[16]",
    "data.image_size=32",
    "data.shuffle_buffer=64",
    "train.batch_size_per_replica=8",
    "train.steps_per_epoch=8",
    "train.backup_every_steps=3",
    "phases.feature_extraction.epochs=1",
    "phases.fine_tuning.epochs=2",
    "runtime.verbose=0",
    "runtime.collective_timeout_seconds=120",
    "output.evaluation_report=false",
    "monitoring.enabled=false",
]
_QUICK_CHANGES = {"train.steps_per_epoch": "2", "phases.fine_tuning.epochs": "1"}
QUICK_RUN = [f"{k}={_QUICK_CHANGES.get(k, v)}" for k, v in (s.split("=", 1) for s in CHECKED_RUN)]
PROBE_STEPS = {"full": 8, "quick": 2}
TOLERANCE = 0.25
#: The goal's band on predicted / measured.
BAND = (1 - TOLERANCE, 1 + TOLERANCE)


def measure_plan(root: str, dataset: str, worker_counts: list[int], quick: bool, timeout: float,
                 say: Callable[[str], None]) -> dict:  # fmt: skip
    settings = [*(QUICK_RUN if quick else CHECKED_RUN), f"data.dataset={dataset}"]
    steps = PROBE_STEPS["quick" if quick else "full"]
    checked = {}
    for workers in worker_counts:
        say(f"bench: trainer plan against a {workers}-worker run (probe, run, probe)")
        checked[str(workers)] = rounds.measured(
            lambda n=workers: check_one(root, settings, n, steps, timeout), snapshot=rounds.cpu_snapshot_with_children
        )
        checked[str(workers)]["figure"] = rounds.single(checked[str(workers)]["ratio"], checked[str(workers)]["load"])
    return {"settings": settings[:-1], "probe_steps": steps, "band": list(BAND), "workers": checked}


def check_one(root: str, settings: list[str], workers: int, steps: int, timeout: float) -> dict:
    name = f"plan-{workers}w"
    before = probe(root, f"{name}-probe-before", settings, workers, steps, timeout)
    output = os.path.join(root, f"{name}-run")
    command = ["train"] if workers == 1 else ["launch", "--workers", str(workers)]
    run_step([*entrypoint_command(), *command, *set_args(*settings, f"output.dir={output}")], root, name, timeout)
    after = probe(root, f"{name}-probe-after", settings, workers, steps, timeout)
    with open(os.path.join(output, "metrics.jsonl")) as fh:
        measured = [json.loads(line)["train_seconds"] for line in fh if line.strip()]
    return compare(before, after, measured)


def compare(before: list[float], after: list[float], measured: list[float]) -> dict:
    """Predicted (mean of the two probes, per epoch) against measured training seconds."""
    if not (len(before) == len(after) == len(measured)):
        raise ValueError(f"epochs: probes predicted {len(before)} and {len(after)}, the run had {len(measured)}")
    predicted = [round((a + b) / 2, 3) for a, b in zip(before, after, strict=True)]
    return {
        "predicted_epoch_seconds": predicted,
        "probe_before": before,
        "probe_after": after,
        "measured_epoch_seconds": measured,
        "predicted_seconds": round(sum(predicted), 3),
        "measured_seconds": round(sum(measured), 3),
        "ratio": round(sum(predicted) / sum(measured), 3),
    }


def probe(root: str, name: str, settings: list[str], workers: int, steps: int, timeout: float) -> list[float]:
    """`trainer plan --probe`'s training seconds of every epoch of the run, in order."""
    out = os.path.join(root, f"{name}.json")
    command = [*entrypoint_command(), "plan", "--gpu", "cpu", "--probe", "--local", "--workers", str(workers),
               "--probe-steps", str(steps), "--json", *set_args(*settings)]  # fmt: skip
    # The plan's JSON goes to stdout, which run_step logs with stderr: print it to a file instead.
    script = f'exec "$@" > {shlex.quote(out)}'
    run_step(["/bin/sh", "-c", script, "plan", *command], root, name, timeout)
    with open(out) as fh:
        return predicted_epochs(json.load(fh), workers)


def predicted_epochs(plan: dict, workers: int) -> list[float]:
    """Training seconds of every epoch the run has, in order: the first of a phase includes its tracing."""
    row = next(r for r in plan["rows"] if r["workers"] == workers)
    return [
        p["first_epoch_train_seconds"] if epoch == 0 else p["train_seconds_per_epoch"]
        for p in row["phases"]
        for epoch in range(p["epochs"])
    ]


# --------------------------------------------------------------------------- goals and markdown


def figure(workers: int) -> Callable[[dict], dict]:
    return lambda r: r["plan_check"]["workers"][str(workers)]["figure"]


def markdown_lines(result: dict) -> list[str]:
    p = result.get("plan_check")
    if not p:
        return []
    lines = [
        "## 8. `trainer plan` against measured runs (one run per worker count, on this bench's prepared dataset)",
        "",
        "`trainer plan --gpu cpu --probe --local --workers N --json` just before and just after each run; the "
        "prediction is the mean of the two probes' training seconds per epoch (a phase's first epoch with its "
        "tracing), the measurement the sum of the run's per-epoch `train_seconds` (metrics.jsonl). Settings: "
        f"`{' '.join(p['settings'])}`, probes of {p['probe_steps']} steps per phase. Goal: predicted / measured "
        f"within {p['band'][0]:.2f}-{p['band'][1]:.2f}.",
        "",
        "| run | predicted s per epoch (before / after probe) | measured s per epoch | predicted / measured total | "
        "load |",
        "|---|---|---|---|---|",
    ]
    for workers, c in p["workers"].items():
        run = "`trainer train`, 1 worker" if workers == "1" else f"`trainer launch --workers {workers}`"
        probes = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(c["probe_before"], c["probe_after"], strict=True))
        load = c["load"]
        mark = "**busy**, does not count" if load["busy"] else "unmarked"
        lines.append(
            f"| {run} | {probes} | {', '.join(f'{s:.2f}' for s in c['measured_epoch_seconds'])} | "
            f"{c['predicted_seconds']:.2f} / {c['measured_seconds']:.2f} = **{c['ratio']:.2f}** | "
            f"{mark} ({load['other_cores']:.2f} other cores) |"
        )
    if "2" not in p["workers"]:
        lines.append("| `trainer launch --workers 2` | not run in quick mode | | | |")
    return [*lines, ""]
