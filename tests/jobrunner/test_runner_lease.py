"""A `helm upgrade` that rescales a run, through the job runner: the old Job's pods are still
stopping (SIGTERM, grace period) when the new Job's start on the same output. The new Job waits
for the old one's lease (trainer.train.lease) instead of training alongside it, then resumes the
run from the old Job's backup; nothing of the two mixes.
"""

from __future__ import annotations

import copy
import json
import time

import pytest

from tests.support.jobs import NAMESPACE, TINY_TRAINER, Capture, condition_types, needs_namespaces, render
from tests.support.training import make_tiny_dataset
from trainer.contract import LEASE_FILE, ExitCode
from trainer.jobrunner import JobRunner

pytestmark = [pytest.mark.slow, needs_namespaces]


def _job(tmp_path, name: str, workers: int, dataset: str, output: str) -> str:
    trainer = copy.deepcopy(TINY_TRAINER)
    # Long enough to be caught mid-phase: at 30 steps the old Job finished first on a fast CPU (Zen 5, CI).
    trainer["train"]["steps_per_epoch"] = 100
    trainer["phases"]["fine_tuning"]["epochs"] = 1
    directory = tmp_path / name
    directory.mkdir()
    values = {"workers": workers, "dataset": dataset, "output": output, "trainer": trainer, "job": {"runId": name}}
    return render(directory, values)


@pytest.mark.timeout(600)
def test_the_job_of_an_upgrade_waits_for_the_old_jobs_lease_then_resumes_its_run(tmp_path):
    dataset, output = make_tiny_dataset(tmp_path / "data"), tmp_path / "run"
    old = JobRunner(_job(tmp_path, "old", 2, dataset, str(output)), namespace=NAMESPACE, sink=Capture())
    new = JobRunner(_job(tmp_path, "new", 1, dataset, str(output)), namespace=NAMESPACE, sink=Capture())
    with old, new:
        old.start()
        old.wait_for(lambda: list((output / "backup").rglob("checkpoint")), timeout=240, what="the old Job's backup")
        new.start()  # helm upgrade: the new Job is created while the old one still runs
        new.wait_for(lambda: new.pods and new.pods[0].log, timeout=60, what="the new Job's chief")
        time.sleep(5)  # the new chief is past its start-up and at the lease
        holder = json.loads((output / LEASE_FILE).read_text())["owner"]
        old.stop("Deleted", "helm upgrade deleted the old Job")  # SIGTERM: back up, exit 76, release
        old.wait(timeout=120)
        status = new.wait(timeout=400)
        old_exits = [pod.exit_code for pod in old.pods]

    assert holder == f"job {NAMESPACE}/{old.name}"  # the old Job kept the output while it ran
    assert old_exits == [ExitCode.PREEMPTED, ExitCode.PREEMPTED], old_exits
    assert condition_types(status)[-1][0] == "Complete", new.pod_log(0)[-4000:]
    assert not [e for e in new.events if e.reason == "PodFailed"]  # it waited; no retry was spent
    summary = json.loads((output / "summary.json").read_text())
    assert summary["distribution"]["workers"] == 1
    assert [summary["phases"][p]["epochs_run"] for p in ("feature_extraction", "fine_tuning")] == [1, 1]
    assert json.loads((output / "attempts.json").read_text())["attempts"] == 2  # one run, started twice
    assert not (output / LEASE_FILE).exists()
