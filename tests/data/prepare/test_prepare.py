"""`prepare_dataset`: image folder in, TFRecord shards + manifest + report out.

Runs on small real image files in a temporary folder and reads the shards back with tf.data;
the pure split and shard helpers are tested in test_splits.py and test_shards.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.config import PrepareConfig
from trainer.contract import PREPARE_PROGRESS_FILE, PREPARE_REPORT_FILE
from trainer.data import records
from trainer.data.manifest import Manifest, read_manifest
from trainer.data.prepare import (
    CORRUPT,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    UNREADABLE,
    prepare_dataset,
)
from trainer.errors import ConfigError, DataError

SIDE = 40  # test images are 40x40: above the default 32-pixel minimum, tiny on disk


# --------------------------------------------------------------------------- helpers


def config(**overrides) -> PrepareConfig:
    """Small-dataset settings: one process (no pool start-up), few shards, a fixed seed."""
    return PrepareConfig(**{"processes": 1, "min_shards": 2, "seed": 7, **overrides})


def noise(size: tuple[int, int] = (SIDE, SIDE), seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_image(
    path: Path, fmt: str = "JPEG", size: tuple[int, int] = (SIDE, SIDE), seed: int = 0, mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(noise(size, seed)).convert(mode)
    image.save(path, fmt)
    return path


def write_classes(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    for c, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            write_image(root / name / f"img{i:03d}.jpg", seed=seed * 1000 + c * 100 + i)


def read_split(output: Path, manifest: Manifest, split: str) -> list[dict]:
    """Every record of a split, parsed with the reader's feature spec plus the traceability fields."""
    spec = {
        **records.feature_spec(),
        records.CLASS_NAME: tf.io.FixedLenFeature([], tf.string),
        records.SOURCE: tf.io.FixedLenFeature([], tf.string),
    }
    files = [str(output / shard.path) for shard in manifest.shards[split]]
    if not files:
        return []
    dataset = tf.data.TFRecordDataset(files).map(lambda raw: tf.io.parse_single_example(raw, spec))
    return [{key: value.numpy() for key, value in example.items()} for example in dataset]


def count_records(path: Path) -> int:
    return sum(1 for _ in tf.data.TFRecordDataset(str(path)))


@pytest.fixture
def messages() -> list[str]:
    return []


# --------------------------------------------------------------------------- datasets on disk


def test_flat_folder_is_split_sharded_and_described_by_the_manifest(tmp_path, messages):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"cats": 10, "dogs": 10, "owls": 5})

    report = prepare_dataset(str(source), str(output), config(validation_fraction=0.2), progress=messages.append)

    manifest = read_manifest(str(output))
    assert manifest == report.manifest
    assert manifest.class_names == ["cats", "dogs", "owls"]
    assert manifest.counts["train"] == {"cats": 8, "dogs": 8, "owls": 4}
    assert manifest.counts["validation"] == {"cats": 2, "dogs": 2, "owls": 1}
    assert manifest.counts["test"] == {"cats": 0, "dogs": 0, "owls": 0}
    assert manifest.shards["test"] == []
    assert manifest.skipped == 0 and report.skipped == []
    assert manifest.source == str(source)
    assert manifest.created.endswith("+00:00")

    assert [s.path for s in manifest.shards["train"]] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    for split in ("train", "validation"):
        for shard in manifest.shards[split]:
            assert count_records(output / shard.path) == shard.records
            assert (output / shard.path).stat().st_size == shard.bytes

    train = read_split(output, manifest, "train")
    assert len(train) == 20
    for example in train:
        assert manifest.class_names[example[records.LABEL]] == example[records.CLASS_NAME].decode()
        assert example[records.SOURCE].decode().startswith(example[records.CLASS_NAME].decode() + "/")
    pixels = tf.io.decode_image(train[0][records.ENCODED], channels=3)
    assert pixels.shape == (SIDE, SIDE, 3)
    assert (train[0][records.HEIGHT], train[0][records.WIDTH]) == (SIDE, SIDE)


def test_every_file_lands_in_exactly_one_split(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 9, "b": 9})

    report = prepare_dataset(
        str(source), str(output), config(validation_fraction=0.2, test_fraction=0.2), progress=lambda _: None
    )

    seen = [
        e[records.SOURCE].decode()
        for split in ("train", "validation", "test")
        for e in read_split(output, report.manifest, split)
    ]
    expected = sorted(f"{c}/img{i:03d}.jpg" for c in "ab" for i in range(9))
    assert sorted(seen) == expected
    assert report.manifest.counts["test"] == {"a": 2, "b": 2}


def test_jpeg_bytes_are_kept_and_other_formats_become_rgb_png(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})
    write_image(source / "a" / "lossless.png", "PNG", seed=1)
    write_image(source / "a" / "transparent.png", "PNG", seed=2, mode="RGBA")
    write_image(source / "a" / "palette.gif", "GIF", seed=3, mode="P")
    write_image(source / "b" / "bitmap.bmp", "BMP", seed=4)
    write_image(source / "b" / "grey.jpg", "JPEG", seed=5, mode="L")
    write_image(source / "b" / "print.jpg", "JPEG", seed=6, mode="CMYK")

    report = prepare_dataset(str(source), str(output), config(validation_fraction=0.0), progress=lambda _: None)

    stored = {e[records.SOURCE].decode(): e for e in read_split(output, report.manifest, "train")}
    assert len(stored) == 12
    formats = {path: e[records.FORMAT].decode() for path, e in stored.items()}
    assert formats["a/img000.jpg"] == formats["b/grey.jpg"] == formats["b/print.jpg"] == "jpeg"
    assert {formats[p] for p in ("a/lossless.png", "a/transparent.png", "a/palette.gif", "b/bitmap.bmp")} == {"png"}

    # JPEGs (colour and greyscale) are stored byte for byte; CMYK is re-encoded as RGB JPEG.
    assert stored["a/img000.jpg"][records.ENCODED] == (source / "a" / "img000.jpg").read_bytes()
    assert stored["b/grey.jpg"][records.ENCODED] == (source / "b" / "grey.jpg").read_bytes()
    assert stored["b/print.jpg"][records.ENCODED] != (source / "b" / "print.jpg").read_bytes()
    assert Image.open(io.BytesIO(stored["b/print.jpg"][records.ENCODED])).mode == "RGB"

    # PNG re-encoding is lossless: the pixels are the original ones.
    png = Image.open(io.BytesIO(stored["a/lossless.png"][records.ENCODED]))
    assert png.format == "PNG" and png.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(png), noise(seed=1))
    for path in ("a/transparent.png", "a/palette.gif", "b/bitmap.bmp"):
        assert tf.io.decode_image(stored[path][records.ENCODED]).shape == (SIDE, SIDE, 3)


def _smooth(size: tuple[int, int]) -> Image.Image:
    """A gradient image: what survives scaling is then checkable pixel by pixel, unlike noise."""
    x = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, size[1], dtype=np.float32)[:, None, None]
    return Image.fromarray(np.broadcast_to((x + y) / 2, (size[1], size[0], 3)).astype(np.uint8))


def test_images_larger_than_training_reads_are_stored_scaled_down_as_jpeg(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 2, "b": 2})  # 40x40: below 256, stored byte for byte
    (source / "a").mkdir(exist_ok=True)
    _smooth((600, 400)).save(source / "a" / "wide.jpg", "JPEG", quality=95)
    _smooth((300, 900)).save(source / "b" / "tall.png", "PNG")

    report = prepare_dataset(str(source), str(output), config(validation_fraction=0.0), progress=lambda _: None)

    stored = {e[records.SOURCE].decode(): e for e in read_split(output, report.manifest, "train")}
    wide, tall = stored["a/wide.jpg"], stored["b/tall.png"]
    # The shorter side becomes 256 (8/7 of the default 224 input), the aspect ratio stays, the format is JPEG.
    assert (int(wide[records.WIDTH]), int(wide[records.HEIGHT])) == (384, 256)
    assert (int(tall[records.WIDTH]), int(tall[records.HEIGHT])) == (256, 768)
    for record in (wide, tall):
        decoded = tf.io.decode_jpeg(record[records.ENCODED]).numpy()
        assert record[records.FORMAT] == b"jpeg"
        assert decoded.shape == (int(record[records.HEIGHT]), int(record[records.WIDTH]), 3)
    expected = np.asarray(_smooth((600, 400)).resize((384, 256), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(tf.io.decode_jpeg(wide[records.ENCODED]).numpy() - expected).mean() < 2.0
    assert stored["a/img000.jpg"][records.ENCODED] == (source / "a" / "img000.jpg").read_bytes()
    # The manifest says what was stored at which scale.
    extra = report.manifest.extra
    assert extra["prepared_for_image_size"] == 224 and extra["stored_shorter_side"] == 256
    assert extra["downscaled_images"] == 2


def test_image_size_zero_stores_every_jpeg_byte_for_byte(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 2, "b": 2})
    _smooth((600, 400)).save(source / "a" / "wide.jpg", "JPEG", quality=95)

    report = prepare_dataset(
        str(source), str(output), config(validation_fraction=0.0, image_size=0), progress=lambda _: None
    )

    stored = {e[records.SOURCE].decode(): e for e in read_split(output, report.manifest, "train")}
    assert stored["a/wide.jpg"][records.ENCODED] == (source / "a" / "wide.jpg").read_bytes()
    assert report.manifest.extra["downscaled_images"] == 0


def test_existing_split_folders_are_used_as_they_are(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source / "train", {"a": 6, "b": 4}, seed=1)
    write_classes(source / "val", {"a": 2}, seed=2)  # "val" is accepted for validation
    write_classes(source / "test", {"a": 1, "b": 3}, seed=3)

    report = prepare_dataset(
        str(source), str(output), config(validation_fraction=0.5, test_fraction=0.5), progress=lambda _: None
    )

    assert report.manifest.counts == {
        "train": {"a": 6, "b": 4},
        "validation": {"a": 2, "b": 0},
        "test": {"a": 1, "b": 3},
    }
    validation = read_split(output, report.manifest, "validation")
    assert sorted(e[records.SOURCE].decode() for e in validation) == ["val/a/img000.jpg", "val/a/img001.jpg"]


def test_a_missing_validation_folder_is_carved_out_of_train(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source / "train", {"a": 10, "b": 10})
    write_classes(source / "test", {"a": 2, "b": 2}, seed=1)

    report = prepare_dataset(str(source), str(output), config(validation_fraction=0.3), progress=lambda _: None)

    assert report.manifest.counts["train"] == {"a": 7, "b": 7}
    assert report.manifest.counts["validation"] == {"a": 3, "b": 3}
    assert report.manifest.counts["test"] == {"a": 2, "b": 2}


def test_no_validation_split_when_its_fraction_is_zero(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})

    report = prepare_dataset(str(source), str(output), config(validation_fraction=0.0), progress=lambda _: None)

    assert report.manifest.shards["validation"] == []
    assert not report.manifest.has_split("validation")


def test_min_shards_is_capped_by_the_number_of_images(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 4, "b": 3})

    report = prepare_dataset(
        str(source), str(output), config(min_shards=16, validation_fraction=0.3), progress=lambda _: None
    )

    assert report.manifest.split_size("train") == 5
    assert [s.path for s in report.manifest.shards["train"]] == [records.shard_name("train", i, 5) for i in range(5)]
    assert all(s.records == 1 for s in report.manifest.shards["train"])
    assert len(report.manifest.shards["validation"]) == 2


def test_shard_size_sets_the_shard_count_of_a_large_split(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 10, "b": 10})
    total = sum(p.stat().st_size for p in source.rglob("*.jpg"))
    target_mb = total / 4.5 / 1e6  # room for 4.5 shards -> 5

    report = prepare_dataset(
        str(source),
        str(output),
        config(min_shards=1, shard_size_mb=target_mb, validation_fraction=0.0),
        progress=lambda _: None,
    )

    shards = report.manifest.shards["train"]
    assert len(shards) == 5
    assert [s.records for s in shards] == [4, 4, 4, 4, 4]
    assert sorted(p.name for p in output.glob("*.tfrecord")) == [s.path for s in shards]


def test_unusable_files_are_skipped_and_listed(tmp_path, messages):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 5, "b": 5})
    whole = write_image(source / "a" / "broken.jpg", seed=9).read_bytes()
    (source / "a" / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # truncated mid-scan
    (source / "b" / "notes.txt").write_text("not a picture")
    write_image(source / "b" / "thumb.png", "PNG", size=(20, 50))  # shorter side 20 < 32
    write_image(source / "b" / ".hidden.jpg")  # hidden files are not candidates at all

    report = prepare_dataset(str(source), str(output), config(), progress=messages.append)

    assert sorted(report.skipped) == [
        ("a/broken.jpg", CORRUPT),
        ("b/notes.txt", NOT_AN_IMAGE),
        ("b/thumb.png", TOO_SMALL),
    ]
    assert report.manifest.skipped == 3
    assert report.manifest.split_size("train") + report.manifest.split_size("validation") == 10

    saved = json.loads((output / PREPARE_REPORT_FILE).read_text())
    assert saved["skipped_count"] == 3
    assert saved["skipped_by_reason"] == {CORRUPT: 1, NOT_AN_IMAGE: 1, TOO_SMALL: 1}
    assert {s["path"]: s["reason"] for s in saved["skipped"]}["b/thumb.png"] == TOO_SMALL
    assert "truncated" in {s["path"]: s["detail"] for s in saved["skipped"]}["a/broken.jpg"]

    summary = "\n".join(report.summary_lines())
    assert "skipped 3 file(s)" in summary and "a/broken.jpg" in summary
    assert str(output / "manifest.json") in summary
    # Progress comes every 2 s (a quick run may print none); each line says what and how far.
    assert messages[0] == f"found 13 files in 2 classes under {source}"
    progress = r"(checked|wrote \w+) \d+/\d+ images \(\d+%\), \d+ img/s"
    assert all(re.fullmatch(progress, m) for m in messages[1:])


def test_min_image_side_is_configurable(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})

    with pytest.raises(DataError, match="all 6 files are unusable"):
        prepare_dataset(str(source), str(output), config(min_image_side=SIDE + 1), progress=lambda _: None)


def test_file_size_and_pixel_caps_are_configurable(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})
    write_image(source / "a" / "wide.png", "PNG", size=(SIDE * 4, SIDE))  # 6400 pixels, ~20 kB
    (source / "b" / "big.jpg").write_bytes(write_image(source / "b" / "big.jpg", seed=5).read_bytes() * 40)  # ~65 kB

    report = prepare_dataset(
        str(source),
        str(output),
        config(max_file_mb=0.05, max_image_megapixels=0.005),  # 50 kB, 5000 pixels
        progress=lambda _: None,
    )

    assert sorted(report.skipped) == [("a/wide.png", TOO_MANY_PIXELS), ("b/big.jpg", TOO_LARGE)]
    size = (source / "b" / "big.jpg").stat().st_size
    assert report.details["b/big.jpg"] == f"{size} bytes > 50000, the cap set by prepare.max_file_mb"
    assert report.details["a/wide.png"].startswith("160x40 = 6400 pixels > 5000")
    summary = "\n".join(report.summary_lines())
    assert f"too large: b/big.jpg ({size} bytes > 50000" in summary
    assert report.manifest.extra["max_file_mb"] == 0.05 and report.manifest.extra["max_image_megapixels"] == 0.005


@pytest.mark.timeout(60)
def test_fifos_and_devices_named_like_images_are_skipped_without_reading(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})
    os.mkfifo(source / "a" / "camera.png")  # opening it for reading would wait for a writer forever
    (source / "b" / "zeros.jpg").symlink_to("/dev/zero")  # reading it would never end

    report = prepare_dataset(str(source), str(output), config(), progress=lambda _: None)

    assert sorted(report.skipped) == [("a/camera.png", UNREADABLE), ("b/zeros.jpg", UNREADABLE)]
    assert report.details["a/camera.png"] == "not a regular file but a FIFO"
    assert report.details["b/zeros.jpg"] == "not a regular file but a character device"
    assert report.manifest.split_size("train") + report.manifest.split_size("validation") == 6


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 4, "b": 4})
    output.mkdir()
    stale = output / "train-00000-of-00009.tfrecord"  # another run's shard, recorded as complete
    stale.write_bytes(b"old")
    partial = output / "train-00000-of-00002.tfrecord.partial"  # cut off mid-write (SIGKILL)
    partial.write_bytes(b"half")
    record = {"fingerprint": "x", "records": 1, "bytes": 3}
    (output / PREPARE_PROGRESS_FILE).write_text(json.dumps({"version": 1, "shards": {stale.name: record}}))

    report = prepare_dataset(str(source), str(output), config(), progress=lambda _: None)

    listed = {s.path for split in report.manifest.shards.values() for s in split}
    assert {p.name for p in output.iterdir()} == listed | {"manifest.json", PREPARE_REPORT_FILE}
    assert report.shards_reused == 0


def test_a_process_pool_writes_the_same_shards_as_one_process(tmp_path):
    source = tmp_path / "photos"
    write_classes(source, {"a": 8, "b": 8})
    write_image(source / "b" / "extra.png", "PNG", seed=3)

    inline = prepare_dataset(str(source), str(tmp_path / "one"), config(processes=1), progress=lambda _: None)
    pooled = prepare_dataset(str(source), str(tmp_path / "two"), config(processes=2), progress=lambda _: None)

    assert pooled.manifest.shards == inline.manifest.shards
    for shard in inline.manifest.shards["train"]:
        assert (tmp_path / "two" / shard.path).read_bytes() == (tmp_path / "one" / shard.path).read_bytes()


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path):
    source, output = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 4, "b": 4})
    prepare_dataset(str(source), str(output), config(min_shards=4), progress=lambda _: None)

    with pytest.raises(ConfigError, match="already holds a prepared dataset") as caught:
        prepare_dataset(str(source), str(output), config(min_shards=2), progress=lambda _: None)
    assert "\n" not in str(caught.value)

    report = prepare_dataset(str(source), str(output), config(min_shards=2), progress=lambda _: None, overwrite=True)
    listed = {s.path for split in report.manifest.shards.values() for s in split}
    assert {p.name for p in output.glob("*.tfrecord")} == listed  # no shard of the old run is left


# --------------------------------------------------------------------------- errors


def _flat(root: Path, per_class: dict[str, int]) -> Path:
    write_classes(root, per_class)
    return root


def _with_text_only_class(root: Path) -> Path:
    write_classes(root, {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / "readme.txt").write_text("hello")
    return root


def _all_text(root: Path) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "x.txt").write_text("hello")
    return root


def _unknown_validation_class(root: Path) -> Path:
    write_classes(root / "train", {"a": 3, "b": 3})
    write_classes(root / "validation", {"a": 1, "zebra": 1})
    return root


def _loose_files(root: Path) -> Path:
    write_image(root / "one.jpg")
    return root


def _not_a_directory(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("x")
    return root


@pytest.mark.parametrize(
    ("make_source", "message"),
    [
        (lambda root: root, "does not exist"),
        (_not_a_directory, "is not a directory"),
        (lambda root: (root.mkdir(), root)[1], "empty dataset"),
        (_loose_files, r"empty dataset: .* holds 1 loose file"),
        (lambda root: _flat(root, {"only": 5}), "only one class folder"),
        (_with_text_only_class, r"class folder c has no usable images \(1 file\(s\) skipped: 1 not an image\)"),
        (_all_text, r"all 2 files are unusable \(2 not an image"),
        (_unknown_validation_class, "class folder validation/zebra has no counterpart in train/"),
        (lambda root: _flat(root, {"a": 1, "b": 1}), "validation split is empty"),
    ],
    ids=[
        "missing",
        "file",
        "empty",
        "loose-files",
        "one-class",
        "no-usable-images",
        "all-unusable",
        "unknown-class",
        "empty-validation",
    ],
)
def test_bad_sources_raise_a_one_line_data_error(tmp_path, make_source, message):
    source = make_source(tmp_path / "photos")

    with pytest.raises(DataError, match=message) as caught:
        prepare_dataset(str(source), str(tmp_path / "prepared"), config(), progress=lambda _: None)

    assert "\n" not in str(caught.value)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_an_empty_class_folder_is_an_error(tmp_path):
    source = _flat(tmp_path / "photos", {"a": 3, "b": 3})
    (source / "c").mkdir()

    with pytest.raises(DataError, match="class folder c is empty"):
        prepare_dataset(str(source), str(tmp_path / "prepared"), config(), progress=lambda _: None)


def test_output_inside_the_source_is_refused(tmp_path):
    source = _flat(tmp_path / "photos", {"a": 3, "b": 3})

    with pytest.raises(ConfigError, match="inside the source folder"):
        prepare_dataset(str(source), os.path.join(source, "prepared"), config(), progress=lambda _: None)


def test_a_prepared_dataset_is_readable_by_other_users(tmp_path):
    source = _flat(tmp_path / "photos", {"a": 4, "b": 4})
    output = tmp_path / "prepared"

    done = subprocess.run(
        [sys.executable, "-m", "trainer", "prepare", str(source), str(output), "--set", "prepare.processes=1"],
        capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-2000:]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in output.iterdir()}
    assert {"manifest.json", PREPARE_REPORT_FILE} <= set(modes) and any(n.endswith(".tfrecord") for n in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
