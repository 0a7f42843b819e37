"""Running the chart's rendered Job with the local Job runner (tests/jobrunner/test_runner.py and the
multi-worker fault tests)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from typing import Any

import pytest

from tests.support.processes import LogSink
from trainer.jobrunner import JobRunner
from trainer.jobrunner.network import namespace_mode

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vgg-trainer"
RELEASE = "flowers"
NAMESPACE = "ml"
ISOLATED = namespace_mode()[0] is not None
needs_namespaces = pytest.mark.skipif(
    not ISOLATED, reason=f"per-pod network namespaces unavailable: {namespace_mode()[1]}"
)


def helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("helm")
    if found is None:
        pytest.fail("helm not found in .tools/bin or on PATH; run scripts/tools.sh (fetches helm and kubectl)")
    return found


def render(tmp_path: pathlib.Path, values: dict[str, Any], skip_schema: bool = False) -> str:
    """`helm template` of the real chart with ``values`` (a values file)."""
    base = {"workers": 2, "gpusPerWorker": 0, "dataset": "/data/flowers", "output": "/runs/flowers"}
    values_file = tmp_path / "values.json"
    values_file.write_text(json.dumps({**base, **values}))
    cmd = [helm(), "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(values_file)]
    if skip_schema:
        cmd.append("--skip-schema-validation")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


#: What the job runner writes, kept for the test (and for its timeout report).
Capture = LogSink


def condition_types(status) -> list[tuple[str, str]]:
    return [(c.type, c.reason) for c in status.conditions]


def assert_one_live_pod_per_index(runner: JobRunner) -> None:
    """From the events: a pod of an index starts only after the previous one has terminated."""
    live: dict[int, str] = {}
    for event in runner.events:
        if event.reason == "PodStarted":
            assert event.index not in live, f"{event.pod} started while {live[event.index]} was alive"
            live[event.index] = event.pod
        elif event.reason in ("PodSucceeded", "PodFailed"):
            assert live.pop(event.index) == event.pod
    assert not live


#: The trainer's config for a run small enough for 2 CPU cores (the chart's `trainer` value).
TINY_TRAINER = {
    "recipe": "transfer",
    "model": {"weights": "none", "head": {"dense_units": [16]}},
    "data": {"image_size": 32, "shuffle_buffer": 64},
    "train": {"batch_size_per_replica": 4, "steps_per_epoch": 4, "backup_every_steps": 2},
    "phases": {"feature_extraction": {"epochs": 1}, "fine_tuning": {"epochs": 2}},
    "runtime": {"verbose": 0, "collective_timeout_seconds": 120},
    "output": {"evaluation_report": False},  # seconds per run; tests/train/test_evaluation.py checks the report
}
