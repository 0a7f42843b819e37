"""Planning the shards of a split: how many, which images each holds, and a fingerprint of its contents.

Pure decisions (no file is written here): the count keeps shards near ``prepare.shard_size_mb``
and at least ``prepare.min_shards``; a seeded shuffle mixes classes within every shard; the
fingerprint covers everything that decides a shard's bytes, so a re-run can keep a shard an
interrupted run completed exactly when it would write the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

from trainer.config import PrepareConfig
from trainer.data import records
from trainer.data.prepare.splits import Entry

#: Part of every shard fingerprint: a change to how records are made must not keep old shards.
SHARD_FORMAT_VERSION = 1


def shard_count(total_bytes: int, images: int, shard_size_mb: float, min_shards: int) -> int:
    """Shards for a split: enough to keep each near ``shard_size_mb``, at least ``min_shards``,
    never more than one per image (an empty shard would give a reader nothing)."""
    if images <= 0:
        return 0
    by_size = math.ceil(total_bytes / (shard_size_mb * 1e6))
    return max(1, min(max(by_size, min_shards), images))


def assign_to_shards(count: int, shards: int, seed: int | str) -> list[list[int]]:
    """Item indices per shard: a seeded shuffle cut into runs whose lengths differ by at most one.

    The shuffle mixes classes within every shard, so a worker reading a few shards still
    sees all classes.
    """
    if count == 0:
        return []
    order = list(range(count))
    random.Random(f"{seed}").shuffle(order)
    base, extra = divmod(count, shards)
    cuts, start = [], 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        cuts.append(order[start:end])
        start = end
    return cuts


@dataclass(frozen=True)
class PlannedShard:
    name: str
    entries: list[Entry]
    fingerprint: str  # of everything that decides the shard's bytes: same fingerprint, same shard


def plan_shards(split: str, entries: list[Entry], cfg: PrepareConfig) -> list[PlannedShard]:
    """The shards of a split: names, the images of each (a seeded assignment) and their fingerprints."""
    n = shard_count(sum(e.check.nbytes for e in entries), len(entries), cfg.shard_size_mb, cfg.min_shards)
    plan = [[entries[i] for i in shard] for shard in assign_to_shards(len(entries), n, f"{cfg.seed}/shards/{split}")]
    names = [records.shard_name(split, index, n) for index in range(n)]
    return [
        PlannedShard(name, shard, _fingerprint(name, shard, cfg.jpeg_quality))
        for name, shard in zip(names, plan, strict=True)
    ]


def _fingerprint(name: str, entries: list[Entry], jpeg_quality: int) -> str:
    """A shard's records follow from its name, its images in order, each source file as checked (with the
    size it is stored at), and the quality its downscaled images are encoded with."""
    digest = hashlib.sha256(f"{SHARD_FORMAT_VERSION}\n{name}\n{jpeg_quality}\n".encode())
    for e in entries:
        c = e.check
        fields = [e.file.rel, e.file.class_name, e.label, c.fmt, c.reencode, c.height, c.width, c.file_size, c.mtime_ns]
        digest.update(json.dumps(fields).encode() + b"\n")
    return digest.hexdigest()
