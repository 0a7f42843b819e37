"""Writing planned shards as TFRecords, and keeping what an interrupted run completed.

Locally each shard is written under ``<name>.partial``, renamed when complete and recorded in
``prepare-progress.json`` (the rename and the record happen inside trainer.signals.deferred_stop,
so a SIGTERM never separates them); a re-run keeps recorded shards whose fingerprint is
unchanged. For ``gs://`` each shard is staged in a local file and uploaded in parallel while
later shards are built; an upload skips a shard already there intact, which makes an interrupted
run resumable too. Records are serialized deterministically: shards are byte-identical across runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from trainer import storage
from trainer.contract import PREPARE_PROGRESS_FILE
from trainer.data import records
from trainer.data.manifest import SPLITS, Shard
from trainer.data.prepare.images import payload_job, record_payload
from trainer.data.prepare.shards import SHARD_FORMAT_VERSION, PlannedShard
from trainer.data.prepare.splits import Entry
from trainer.data.prepare.workers import Meter, Progress, Workers
from trainer.signals import deferred_stop

#: A shard is written under its name plus this suffix and renamed when complete (local output).
PARTIAL_SUFFIX = ".partial"


def _existing_shards(output: str, partial: bool = False) -> list[str]:
    suffixes = (records.SHARD_SUFFIX, records.SHARD_SUFFIX + PARTIAL_SUFFIX) if partial else (records.SHARD_SUFFIX,)
    return [
        path
        for split in SPLITS
        for suffix in suffixes
        for path in storage.glob(storage.join(output, f"{split}-*-of-*{suffix}"))
    ]


class ShardSink:
    """Where `prepare` writes shards, and what an interrupted run left that a re-run keeps.

    Locally: in place, each under ``<name>.partial`` until complete, then renamed and
    recorded in prepare-progress.json with its fingerprint; :meth:`resume` keeps recorded
    shards whose fingerprint is unchanged. For gs://: a local staging file per shard,
    uploaded in parallel (while later shards are built) and skipped when an intact copy
    (same size and crc32c) is already there, which makes an interrupted run resumable.
    """

    def __init__(self, output: str, upload_workers: int, say: Progress):
        self.output, self.say = output, say
        self.remote = storage.is_gcs(output)
        self._staging: tempfile.TemporaryDirectory | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._uploads: list[Future] = []
        self.uploaded = self.skipped = 0
        self.bytes_uploaded = 0
        self._count_lock = threading.Lock()
        self.upload_workers = upload_workers
        self.total = 0  # shards planned
        self.uploads_done = 0  # gs://: shards uploaded or found intact
        self.reused = 0  # complete shards of an interrupted run kept as they were (local)
        self.discarded = False  # a shard cut off mid-write was deleted
        self._reusable: dict[str, Shard] = {}
        self._progress: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ShardSink:
        if self.remote:
            self._staging = tempfile.TemporaryDirectory(prefix="prepare-")
            self._pool = ThreadPoolExecutor(self.upload_workers, thread_name_prefix="upload")
        return self

    @property
    def _progress_path(self) -> str:
        return storage.join(self.output, PREPARE_PROGRESS_FILE)

    def resume(self, planned: Sequence[PlannedShard]) -> None:
        """Keep the recorded shards whose contents would be the same; delete every other shard file.

        Deleting stale and partial shards first also frees their space for the new ones.
        """
        self.total = len(planned)
        if self.remote:
            return  # the uploads skip intact shards; stale ones go at the end (remove_stale_shards)
        recorded = self._read_progress()
        for shard in planned:
            entry = recorded.get(shard.name, {})
            path = storage.join(self.output, shard.name)
            if (
                entry.get("fingerprint") == shard.fingerprint
                and entry.get("records") == len(shard.entries)
                and os.path.isfile(path)
                and os.path.getsize(path) == entry.get("bytes")
            ):
                self._reusable[shard.name] = Shard(path=shard.name, records=entry["records"], bytes=entry["bytes"])
        for path in _existing_shards(self.output, partial=True):
            if os.path.basename(path) not in self._reusable:
                os.remove(path)
        # Rewritten with the first new shard; until then the record on disk still holds these (and maybe more).
        self._progress = {name: recorded[name] for name in self._reusable}

    def _read_progress(self) -> dict[str, dict[str, Any]]:
        try:
            body = json.loads(storage.read_text(self._progress_path))
        except (OSError, ValueError):
            return {}  # none (a first run, or one that finished), or unreadable: nothing is kept
        if not isinstance(body, dict) or body.get("version") != SHARD_FORMAT_VERSION:
            return {}
        shards = body.get("shards")
        return {k: v for k, v in shards.items() if isinstance(v, dict)} if isinstance(shards, dict) else {}

    def _write_progress(self) -> None:
        body = {"version": SHARD_FORMAT_VERSION, "shards": self._progress}
        storage.write_text(self._progress_path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    def reuse(self, shard: PlannedShard) -> Shard | None:
        """The shard as an interrupted run completed it, or None when it must be written."""
        kept = self._reusable.get(shard.name)
        if kept is not None:
            self.reused += 1
        return kept

    def path_for(self, name: str) -> str:
        """Where the TFRecord writer writes shard ``name``."""
        if self._staging:
            return os.path.join(self._staging.name, name)
        return storage.join(self.output, name + PARTIAL_SUFFIX)

    def discard(self, name: str) -> None:
        """The shard was cut off mid-write: delete what it has (a re-run deletes it otherwise)."""
        with contextlib.suppress(OSError):
            os.remove(self.path_for(name))
            self.discarded = True

    def finished(self, shard: PlannedShard) -> Shard:
        """The shard is written: rename and record it (local) or start its upload (gs://)."""
        path = self.path_for(shard.name)
        nbytes = os.path.getsize(path)
        if self._pool:
            self._uploads.append(self._pool.submit(self._upload, path, storage.join(self.output, shard.name)))
        else:
            final = storage.join(self.output, shard.name)
            record = {"fingerprint": shard.fingerprint, "records": len(shard.entries), "bytes": nbytes}
            with deferred_stop():  # a SIGTERM lands before or after: a shard and its record go together
                os.replace(path, final)
                self._progress[shard.name] = record
                try:
                    self._write_progress()
                except BaseException:  # e.g. no space left for the record: then the shard does not count either
                    del self._progress[shard.name]
                    with contextlib.suppress(OSError):
                        os.remove(final)
                    self.discarded = True
                    raise
        return Shard(path=shard.name, records=len(shard.entries), bytes=nbytes)

    def _upload(self, path: str, uri: str) -> None:
        from trainer import gcs

        sent = gcs.upload_file(path, uri)
        with self._count_lock:
            if sent:
                self.uploaded += 1
                self.bytes_uploaded += os.path.getsize(path)
            else:
                self.skipped += 1
            self.uploads_done += 1
        os.remove(path)  # keep local disk use near the shards in flight

    def kept_phrase(self) -> str:
        """What an interrupted run leaves: ``3 of 18 shard(s) complete and kept, the partial one removed``."""
        complete = self.uploads_done if self.remote else len(self._progress)
        partial = ", the partial one removed" if self.discarded else ""
        return f"{complete} of {self.total} shard(s) complete and kept{partial}"

    def forget_progress(self) -> None:
        """The dataset is complete: its manifest lists the shards, the progress record goes."""
        if not self.remote:
            with contextlib.suppress(OSError):
                os.remove(self._progress_path)

    def __exit__(self, *exc_info) -> None:
        if not self._pool:
            return
        try:
            for future in self._uploads:
                future.result()  # the first failed upload raises here
            self.say(
                f"uploaded {self.uploaded} shard(s) ({self.bytes_uploaded / 1e6:.1f} MB), "
                f"{self.skipped} already there intact"
            )
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._staging.cleanup()

    def remove_stale_shards(self, keep: set[str]) -> None:
        """Delete shards of an earlier, different run (names not in ``keep``); gs:// only (resume() did it locally)."""
        if not self.remote:
            return
        for uri in _existing_shards(self.output):
            if uri.rsplit("/", 1)[-1] not in keep:
                storage.remove_tree(uri)


def write_split(
    pool: Workers, sink: ShardSink, split: str, plan: list[PlannedShard], say: Progress, jpeg_quality: int = 90
) -> list[Shard]:
    import tensorflow as tf

    meter = Meter(f"wrote {split}", sum(len(shard.entries) for shard in plan), say)
    written: list[Shard] = []
    done = 0
    for shard in plan:
        kept = sink.reuse(shard)
        if kept is None:
            path = sink.path_for(shard.name)
            # One shard's payloads at a time keeps memory near one shard, however large the split.
            jobs = [payload_job(e.check, jpeg_quality) for e in shard.entries]
            try:
                payloads = pool.map_ordered(record_payload, jobs)
                with tf.io.TFRecordWriter(path) as writer:
                    for entry, payload in zip(shard.entries, payloads, strict=True):
                        # deterministic: protobuf map order otherwise varies between processes, and shards must be
                        # byte-identical across runs (reproducible datasets; resumable uploads skip intact shards).
                        writer.write(_example(entry, payload).SerializeToString(deterministic=True))
                        done += 1
                        meter.update(done)
            except BaseException:
                sink.discard(shard.name)  # SIGTERM, a full disk, a changed file: no partial shard stays
                raise
            kept = sink.finished(shard)
        else:
            done += len(shard.entries)
            meter.update(done)
        written.append(kept)
    return written


def _example(entry: Entry, payload: bytes) -> Any:
    c = entry.check
    return records.make_example(payload, c.fmt, c.height, c.width, entry.label, entry.file.class_name, entry.file.rel)
