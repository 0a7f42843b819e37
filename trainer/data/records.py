"""The TFRecord format of a prepared dataset: one tf.train.Example per image.

Shared by `prepare` (writer) and the input pipeline (reader), so the two cannot drift.
Images are stored encoded: JPEG files as they are (so training can use the fast
decode-and-crop path), every other format re-encoded losslessly as PNG.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

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
_HEADER_BYTES = 12  # the length and its CRC, before the data


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


def damage_at(fh: BinaryIO, offset: int) -> str | None:
    """What is wrong with the TFRecord file ``fh`` up to byte ``offset``; None when nothing is.

    TensorFlow's reader names only the byte offset of a bad record (``corrupted record at N``),
    not the file. This walks the record headers from the start (12 bytes each, checked against
    their CRC; the data in between is skipped), and checks the data of the record that spans
    ``offset`` in full. So it reads little more than one record per file, and a file whose
    framing holds up to ``offset`` is not the one TensorFlow could not read.
    """
    position = 0
    while position <= offset:
        fh.seek(position)
        header = fh.read(_HEADER_BYTES)
        if not header:
            return None  # the file ends before the offset
        if len(header) < _HEADER_BYTES:
            return f"the record at byte {position} is cut short"
        (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
        if crc != masked_crc32c(header[:8]):
            return f"the record header at byte {position} fails its checksum"
        end = position + FRAMING_BYTES + length
        if offset < end:
            return _data_damage(fh.read(length + 4), length, position)
        position = end
    return None


def _data_damage(data: bytes, length: int, position: int) -> str | None:
    if len(data) < length + 4:
        return f"the record at byte {position} is cut short"
    if struct.unpack("<I", data[length:])[0] != masked_crc32c(data[:length]):
        return f"the record at byte {position} fails its checksum"
    return None


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC32C, rotated right by 15 bits plus a constant."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
