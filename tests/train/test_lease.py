"""The run's lease on its output (trainer.train.lease), on local disk: who may take it, and when.

The same rules on gs:// are in tests/train/test_run_gcs.py; two real `trainer train` processes on
one output in tests/train/test_run.py; the `helm upgrade` overlap in tests/jobrunner/test_runner_lease.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from tests.support.leases import start_together
from trainer.contract import LEASE_FILE, Env
from trainer.train.lease import Holder, Lease, LeaseHeld, this_holder, wait_until_free

OLD_JOB = Holder("job default/run-aaaa1111", "pod-0", 1)
NEW_JOB = Holder("job default/run-bbbb2222", "pod-1", 1)


def _record(output) -> dict:
    return json.loads((output / LEASE_FILE).read_text())


def test_a_second_run_fails_at_once_naming_the_holder(tmp_path):
    held = Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)

    with pytest.raises(LeaseHeld) as err:
        Lease.acquire(str(tmp_path), NEW_JOB, expires_after=120, wait_seconds=0)

    message = str(err.value)
    assert "job default/run-aaaa1111" in message and "host pod-0" in message and held.record.since in message
    assert err.value.exit_code == 75  # retried: the lease is free once the holder is gone
    assert _record(tmp_path)["owner"] == OLD_JOB.owner


def test_the_same_owner_takes_its_lease_over_after_a_restart(tmp_path):
    first = Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)

    again = Lease.acquire(str(tmp_path), Holder(OLD_JOB.owner, "pod-0-restarted", 7), expires_after=120, wait_seconds=0)

    assert again.record.token != first.record.token and _record(tmp_path)["host"] == "pod-0-restarted"
    first.renew()  # the old process, should it still run, finds it lost the lease
    assert first.lost.is_set()
    with pytest.raises(LeaseHeld):
        first.ensure_held()


def test_a_lease_not_renewed_in_time_expires(tmp_path):
    Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)
    record = _record(tmp_path)
    (tmp_path / LEASE_FILE).write_text(json.dumps({**record, "renewed_unix": record["renewed_unix"] - 121}))

    taken = Lease.acquire(str(tmp_path), NEW_JOB, expires_after=120, wait_seconds=0)

    assert _record(tmp_path)["token"] == taken.record.token


def test_a_local_holder_whose_process_is_gone_is_stale_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Holder("trainer train pid X", this_holder().host, int(gone.stdout))
    Lease.acquire(str(tmp_path), dead, expires_after=120, wait_seconds=0)

    Lease.acquire(str(tmp_path), this_holder(), expires_after=120, wait_seconds=0)

    assert _record(tmp_path)["pid"] == os.getpid()


def test_a_waiting_run_takes_the_lease_once_the_holder_releases_it(tmp_path):
    held = Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)
    threading.Timer(1.0, held.release).start()

    taken = Lease.acquire(str(tmp_path), NEW_JOB, expires_after=120, wait_seconds=30)

    assert _record(tmp_path)["owner"] == NEW_JOB.owner and not taken.lost.is_set()


def test_release_removes_only_a_lease_still_held(tmp_path):
    first = Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)
    second = Lease.acquire(str(tmp_path), Holder(OLD_JOB.owner, "pod-0", 2), expires_after=120, wait_seconds=0)

    first.release()  # lost already: must not delete the new holder's record
    assert _record(tmp_path)["token"] == second.record.token
    second.release()
    assert not (tmp_path / LEASE_FILE).exists()
    wait_until_free(str(tmp_path), NEW_JOB, wait_seconds=0)


def test_renewal_keeps_the_lease_fresh(tmp_path):
    lease = Lease.acquire(str(tmp_path), OLD_JOB, expires_after=120, wait_seconds=0)
    before = _record(tmp_path)["renewed_unix"]

    lease.renew()

    assert _record(tmp_path)["renewed_unix"] > before and not lease.lost.is_set()


def test_of_two_runs_starting_together_exactly_one_holds_the_output(tmp_path):
    won, refused = start_together(str(tmp_path), 8)

    assert len(won) == 1 and len(refused) == 8 - 1
    assert _record(tmp_path)["token"] == won[0].record.token


def test_the_holder_is_the_job_on_kubernetes_and_the_launcher_locally():
    job = this_holder({Env.JOB_NAME.value: "run-abc", Env.NAMESPACE.value: "ml"})
    launched = this_holder({Env.RUN_OWNER.value: "trainer launch pid 12 on laptop"})

    assert job.owner == "job ml/run-abc" and job.is_job
    assert launched.owner == "trainer launch pid 12 on laptop" and launched.pid == os.getppid()
    assert this_holder({}).owner.startswith(f"trainer train pid {os.getpid()} on ")
