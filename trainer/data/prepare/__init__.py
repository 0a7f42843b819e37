"""`trainer prepare`: turn an image folder into TFRecord shards plus a manifest.

One concern per module, in the order a run meets them:

| module | owns |
|---|---|
| :mod:`.run` | the command from start to end (``prepare_dataset``) and what an interruption kept |
| :mod:`.source` | listing the source folder: split and class folders, candidate files |
| :mod:`.images` | checking and decoding one file (the skip reasons), the bytes of its record |
| :mod:`.splits` | train / validation / test: folders, or a seeded stratified split |
| :mod:`.shards` | planning shards: count, images per shard, fingerprints (pure) |
| :mod:`.writing` | writing shards, resuming an interrupted run, uploading to gs:// |
| :mod:`.output` | refusing unsafe or unwritable outputs; explaining write errors |
| :mod:`.report` | the printed summary and ``prepare-report.json`` |
| :mod:`.workers` | the process pool that checks and encodes, progress lines |

Only the local source folder is read with the standard library; the output goes through
:mod:`trainer.storage`, so it may be a ``gs://`` prefix. Callers use the names below.
"""

from trainer.data.prepare.images import (
    CORRUPT,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    UNREADABLE,
    UNSUPPORTED,
    ImageCheck,
    inspect_image,
    reencode,
    to_rgb,
)
from trainer.data.prepare.report import PrepareReport
from trainer.data.prepare.run import prepare_dataset
from trainer.data.prepare.shards import assign_to_shards, plan_shards, shard_count
from trainer.data.prepare.source import SPLIT_FOLDERS, discover_source
from trainer.data.prepare.splits import split_sizes, stratified_split
from trainer.data.prepare.writing import PARTIAL_SUFFIX, ShardSink

__all__ = [
    "CORRUPT",
    "NOT_AN_IMAGE",
    "PARTIAL_SUFFIX",
    "SPLIT_FOLDERS",
    "TOO_LARGE",
    "TOO_MANY_PIXELS",
    "TOO_SMALL",
    "UNREADABLE",
    "UNSUPPORTED",
    "ImageCheck",
    "PrepareReport",
    "ShardSink",
    "assign_to_shards",
    "discover_source",
    "inspect_image",
    "plan_shards",
    "prepare_dataset",
    "reencode",
    "shard_count",
    "split_sizes",
    "stratified_split",
    "to_rgb",
]
