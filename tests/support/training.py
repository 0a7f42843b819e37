"""Shared pieces of the tests that run real training processes."""

from __future__ import annotations

import pathlib

from tests.support.processes import LogSink  # re-exported for the tests
from trainer.config import set_args  # re-exported for the tests

__all__ = ["TINY_RUN", "LogSink", "cut_after_records", "make_tiny_dataset", "set_args"]

#: A run small enough for 2 CPU cores: random-weight VGG16 at 32x32, a few steps per phase. The
#: transfer recipe (frozen base, then block5) keeps both phases and their fast steps.
TINY_RUN = [
    "recipe=transfer",
    "model.weights=none",
    "model.head.dense_units=[16]",
    "data.image_size=32",
    "data.shuffle_buffer=64",
    "train.batch_size_per_replica=4",
    "train.steps_per_epoch=4",
    "train.backup_every_steps=2",
    "phases.feature_extraction.epochs=1",
    "phases.fine_tuning.epochs=2",
    "runtime.verbose=0",
    "runtime.collective_timeout_seconds=120",
    "output.evaluation_report=false",  # seconds per run; tests/train/test_evaluation.py turns it on
]


def cut_after_records(shard: pathlib.Path, keep: int) -> None:
    """Truncate a TFRecord file after its first ``keep`` records: still a valid file, just shorter."""
    data, offset = shard.read_bytes(), 0
    for _ in range(keep):
        length = int.from_bytes(data[offset : offset + 8], "little")
        offset += 8 + 4 + length + 4  # length, its CRC, the record, its CRC
    assert offset < len(data), f"{shard} has no more than {keep} records"
    shard.write_bytes(data[:offset])


def records_of(shard: pathlib.Path) -> list[bytes]:
    import tensorflow as tf

    return [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]


def merge_last_two_records(shard: pathlib.Path) -> None:
    """Rewrite a shard with one record fewer and the same size: its last two become one padded record.

    The size check passes; only counting the records read tells.
    """
    import tensorflow as tf

    kept = records_of(shard)
    last, before = tf.train.Example.FromString(kept[-1]), kept[:-2]
    target = len(kept[-2]) + len(kept[-1]) + 16  # one record's framing freed
    for pad in range(target, 0, -1):
        example = tf.train.Example()
        example.CopyFrom(last)
        example.features.feature["padding"].bytes_list.value.append(b"\0" * pad)
        if len(example.SerializeToString()) == target:
            break
    else:
        raise AssertionError("no padding gives the size")
    size = shard.stat().st_size
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in [*before, example.SerializeToString()]:
            writer.write(record)
    assert shard.stat().st_size == size


def make_tiny_dataset(
    root: pathlib.Path, per_class: int = 12, validation_fraction: float = 0.25, test_fraction: float = 0.25
) -> str:
    """3 classes of 40x40 images, prepared into train (4 shards), validation and test; returns the dataset dir.

    With the defaults: 18 training, 9 validation and 9 test images, so under 2 workers x 4 images
    per replica the last global batch of each evaluation holds 1 image.
    """
    from trainer.config import PrepareConfig
    from trainer.data.prepare import prepare_dataset
    from trainer.data.synthetic import make_demo_images

    make_demo_images(str(root / "images"), classes=3, per_class=per_class, size=40, seed=1)
    cfg = PrepareConfig(validation_fraction=validation_fraction, test_fraction=test_fraction, min_shards=4, processes=1)
    prepare_dataset(str(root / "images"), str(root / "dataset"), cfg, progress=lambda _: None)
    return str(root / "dataset")
