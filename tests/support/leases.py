"""Runs racing for one output's lease (tests/train/test_lease.py, local; test_lease_gcs.py, gs://)."""

from __future__ import annotations

import threading

from trainer.train.lease import Holder, Lease, LeaseHeld


def start_together(root: str, runs: int) -> tuple[list[Lease], list[Holder]]:
    """``runs`` different Jobs acquire ``root``'s lease at the same instant: (leases won, holders refused)."""
    holders = [Holder(f"job default/run-{i}", f"pod-{i}", 1) for i in range(runs)]
    won, refused, barrier = [], [], threading.Barrier(runs)

    def start(holder: Holder) -> None:
        barrier.wait()
        try:
            won.append(Lease.acquire(root, holder, expires_after=120, wait_seconds=0))
        except LeaseHeld:
            refused.append(holder)

    threads = [threading.Thread(target=start, args=(h,)) for h in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return won, refused
