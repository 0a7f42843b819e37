"""Optional local staging of a worker's own shards (``data.staging``).

Reading shards straight from gs:// works, but every epoch pays the network again. With
staging on, each worker copies its own shards to local scratch disk (the pod's emptyDir)
in background threads as soon as training starts, verifying every copy (crc32c during the
download, size against the manifest). Until a shard's copy is complete the pipeline reads
it remotely, so staging never delays the first step; later epochs read the local copies.
Shards beyond the disk budget stay remote. Copies survive a process restart on the same
disk and are reused when their size still matches.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from trainer import storage

log = logging.getLogger(__name__)


#: Share of the free disk staging may fill when its budget follows the disk (budget_gb 0): the rest is for caches.
DISK_SHARE = 0.9


def budget_bytes(budget_gb: float, directory: str) -> int:
    """Bytes staging may use: ``budget_gb``, or (0) DISK_SHARE of the free space where it stages.

    The chart sets budget_gb from scratch.sizeLimit, since an emptyDir's free space is the node's.
    """
    if budget_gb > 0:
        return int(budget_gb * 1e9)
    os.makedirs(directory, exist_ok=True)
    return int(shutil.disk_usage(directory).free * DISK_SHARE)


def plan_staging(sizes: Sequence[int], budget_bytes: int) -> list[bool]:
    """Which shards (in order) fit in the disk budget: a pure function of sizes and budget."""
    chosen, used = [], 0
    for size in sizes:
        fits = used + size <= budget_bytes
        chosen.append(fits)
        used += size if fits else 0
    return chosen


class ShardStager:
    def __init__(self, uris: Sequence[str], sizes: Sequence[int], directory: str, budget_bytes: int, workers: int):
        self.uris = list(uris)
        self.local = [os.path.join(directory, uri.rsplit("/", 1)[-1]) for uri in self.uris]
        self.sizes = list(sizes)
        self._ready = [False] * len(self.uris)
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        chosen = plan_staging(self.sizes, budget_bytes)
        skipped = len(chosen) - sum(chosen)
        if skipped:
            log.warning(
                "staging: %d of %d shard(s) exceed the %.1f GB budget and are read remotely",
                skipped,
                len(chosen),
                budget_bytes / 1e9,
            )
        self._pool = ThreadPoolExecutor(max(workers, 1), thread_name_prefix="stage")
        self.futures = [self._pool.submit(self._stage, i) for i, fits in enumerate(chosen) if fits]

    def _stage(self, index: int) -> None:
        local, size = self.local[index], self.sizes[index]
        if not (os.path.exists(local) and os.path.getsize(local) == size):
            storage.copy_verified(self.uris[index], local, size)
        with self._lock:
            self._ready[index] = True

    def paths(self) -> Iterator[str]:
        """Each shard's best location right now: the local copy when complete, else the URI."""
        for i, uri in enumerate(self.uris):
            with self._lock:
                ready = self._ready[i]
            yield self.local[i] if ready else uri

    def wait(self) -> None:
        """Block until every planned copy is done (raises the first failure)."""
        for future in self.futures:
            future.result()

    @property
    def staged(self) -> int:
        with self._lock:
            return sum(self._ready)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
