"""The run's lease on gs:// (trainer.train.lease): create-only and conditional writes on a real GCS API.

The proxy in front of the emulator enforces ifGenerationMatch as GCS does (tests/support/gcs.py).
"""

from __future__ import annotations

import json

import pytest

from tests.support.leases import start_together
from trainer import gcs as gcs_lib
from trainer import storage
from trainer.contract import LEASE_FILE
from trainer.train.lease import Holder, Lease, LeaseHeld

OLD_JOB = Holder("job default/run-aaaa1111", "pod-0", 1)
NEW_JOB = Holder("job default/run-bbbb2222", "pod-1", 1)


@pytest.fixture
def output(gcs_bucket, gcs, monkeypatch) -> str:
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    gcs_lib.client.cache_clear()
    yield f"gs://{gcs_bucket}/run"
    gcs_lib.client.cache_clear()


def _record(output: str) -> dict:
    return json.loads(storage.read_text(storage.join(output, LEASE_FILE)))


def _uploads(gcs):
    """The object uploads (the lease is the only object these tests write through the trainer)."""
    return gcs.requests(path_contains="uploadType=", method="POST")


def test_of_two_runs_starting_together_exactly_one_holds_the_output(output, gcs):
    won, refused = start_together(output, 6)

    assert len(won) == 1 and len(refused) == 6 - 1
    assert _record(output)["token"] == won[0].record.token
    creates = [r for r in _uploads(gcs) if "ifGenerationMatch=0" in r.path]
    assert len(creates) >= 2 and sum(r.status == 200 for r in creates) == 1  # the others answered 412


def test_a_second_run_is_refused_naming_the_holder_and_the_same_job_takes_it_over(output):
    first = Lease.acquire(output, OLD_JOB, expires_after=120, wait_seconds=0)
    with pytest.raises(LeaseHeld, match="job default/run-aaaa1111"):
        Lease.acquire(output, NEW_JOB, expires_after=120, wait_seconds=0)

    restarted = Lease.acquire(output, Holder(OLD_JOB.owner, "pod-0-again", 9), expires_after=120, wait_seconds=0)

    first.renew()  # the replaced process finds the generation moved on
    assert first.lost.is_set() and not restarted.lost.is_set()
    first.release()
    assert _record(output)["token"] == restarted.record.token
    restarted.renew()
    assert not restarted.lost.is_set()
    restarted.release()
    assert not storage.exists(storage.join(output, LEASE_FILE))


def test_a_stale_lease_is_taken_with_a_write_conditional_on_its_generation(output, gcs):
    Lease.acquire(output, OLD_JOB, expires_after=120, wait_seconds=0)
    record = _record(output)
    storage.write_text(storage.join(output, LEASE_FILE), json.dumps({**record, "renewed_unix": 0}))

    taken = Lease.acquire(output, NEW_JOB, expires_after=120, wait_seconds=0)

    assert _record(output)["token"] == taken.record.token
    takeover = _uploads(gcs)[-1]
    assert "ifGenerationMatch=" in takeover.path and "ifGenerationMatch=0" not in takeover.path
