"""The TFRecord format of a prepared dataset: one tf.train.Example per image.

Shared by `prepare` (writer) and the input pipeline (reader), so the two cannot drift.
Images are stored encoded: JPEG files as they are (so training can use the fast
decode-and-crop path), every other format re-encoded losslessly as PNG.
"""

from __future__ import annotations

ENCODED = "image/encoded"
FORMAT = "image/format"  # b"jpeg" or b"png"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/class/label"
CLASS_NAME = "image/class/text"
SOURCE = "image/source"  # path relative to the source folder, for tracing bad records

SHARD_SUFFIX = ".tfrecord"
#: TFRecord framing around each record on disk: length (8 bytes) + its CRC (4) + the data's CRC (4).
FRAMING_BYTES = 16


def shard_name(split: str, index: int, count: int) -> str:
    """``train-00003-of-00016.tfrecord``: order and total are obvious from the name."""
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def make_example(encoded: bytes, fmt: str, height: int, width: int, label: int, class_name: str, source: str):
    import tensorflow as tf

    def _bytes(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def _int(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    return tf.train.Example(
        features=tf.train.Features(
            feature={
                ENCODED: _bytes(encoded),
                FORMAT: _bytes(fmt.encode()),
                HEIGHT: _int(height),
                WIDTH: _int(width),
                LABEL: _int(label),
                CLASS_NAME: _bytes(class_name.encode()),
                SOURCE: _bytes(source.encode()),
            }
        )
    )


def feature_spec():
    import tensorflow as tf

    return {
        ENCODED: tf.io.FixedLenFeature([], tf.string),
        FORMAT: tf.io.FixedLenFeature([], tf.string),
        HEIGHT: tf.io.FixedLenFeature([], tf.int64),
        WIDTH: tf.io.FixedLenFeature([], tf.int64),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
    }
