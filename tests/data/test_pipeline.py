"""trainer.data.pipeline: worker shards, evaluation decoding, training/evaluation datasets."""

from __future__ import annotations

import dataclasses
import io
import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.config import AugmentConfig, DataConfig
from trainer.data import pipeline, records
from trainer.errors import DataError

NUM_CLASSES = 3
IMAGE_SIZE = 32


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG" if fmt == "jpeg" else "PNG", quality=95)
    return buffer.getvalue()


def gradient_image(height: int = 48, width: int = 64) -> np.ndarray:
    """Red grows left to right, green top to bottom, blue is flat: any mis-placed crop or channel swap shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4, y * 5, np.full_like(x, 80)], axis=-1).astype(np.uint8)


def reference_eval_image(pixels: np.ndarray, size: int, fraction: float, centred: bool = True) -> np.ndarray:
    """The evaluation image computed independently: numpy centre crop, PIL resize (RGB, 0-255)."""
    height, width = pixels.shape[:2]
    side = int(min(height, width) * fraction)
    top, left = ((height - side) // 2, (width - side) // 2) if centred else (0, 0)
    crop = Image.fromarray(pixels[top : top + side, left : left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)


def write_shards(directory, num_records: int = 10, num_shards: int = 2) -> list[str]:
    """Record i (label i % 3, alternately JPEG and PNG) goes to shard i % num_shards."""
    rng = np.random.default_rng(0)
    paths = [str(directory / records.shard_name("train", i, num_shards)) for i in range(num_shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i in range(num_records):
        pixels = rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)
        fmt = "jpeg" if i % 2 == 0 else "png"
        label = i % NUM_CLASSES
        example = records.make_example(encode(pixels, fmt), fmt, 40, 36, label, f"class{label}", f"img{i}.{fmt}")
        writers[i % num_shards].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture
def data_cfg():
    return DataConfig(image_size=IMAGE_SIZE, shuffle_buffer=16, augment=AugmentConfig())


def first_batch(ds: tf.data.Dataset):
    images, labels = next(iter(ds))
    return images.numpy(), labels.numpy()


# --------------------------------------------------------------------------- shards


def test_shards_for_worker_is_round_robin():
    paths = [f"train-{i}" for i in range(7)]

    assert pipeline.shards_for_worker(paths, 3, 0) == ["train-0", "train-3", "train-6"]
    assert pipeline.shards_for_worker(paths, 3, 1) == ["train-1", "train-4"]
    assert pipeline.shards_for_worker(paths, 3, 2) == ["train-2", "train-5"]
    assert pipeline.shards_for_worker(paths, 1, 0) == paths


def test_every_shard_goes_to_exactly_one_worker():
    paths = [f"s{i}" for i in range(10)]

    assigned = [p for w in range(4) for p in pipeline.shards_for_worker(paths, 4, w)]

    assert sorted(assigned) == sorted(paths)


def test_fewer_shards_than_workers_is_a_one_line_data_error():
    with pytest.raises(DataError) as info:
        pipeline.shards_for_worker(["a", "b"], 3, 0, split="train")

    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("split 'train' has 2 shard(s) but the run has 3 workers")
    assert "--set prepare.min_shards=12" in message


# --------------------------------------------------------------------------- damaged shards


def _dataset_of(directory, records_per_shard: int = 5):
    """write_shards in ``directory`` and a manifest of them (the sizes they have now)."""
    from trainer.data.manifest import Manifest, Shard

    paths = write_shards(directory)
    shards = [Shard(pathlib.Path(p).name, records_per_shard, pathlib.Path(p).stat().st_size) for p in paths]
    counts = {"train": {"class0": 10}}
    return paths, Manifest(["class0", "class1", "class2"], counts, {"train": shards})


def _read_all(paths) -> None:
    for _ in tf.data.TFRecordDataset(paths):
        pass


def _data_loss_message(paths) -> str:
    with pytest.raises(tf.errors.DataLossError) as info:
        _read_all(paths)
    return str(info.value)


def test_a_shard_with_overwritten_bytes_is_named_with_the_record(tmp_path):
    paths, manifest = _dataset_of(tmp_path)
    data = bytearray(pathlib.Path(paths[1]).read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8  # same size: only the checksums tell
    pathlib.Path(paths[1]).write_bytes(bytes(data))
    assert paths[1] not in _data_loss_message(paths)  # what TensorFlow says names no file

    with pytest.raises(DataError) as info, pipeline.naming_damaged_shards(str(tmp_path), manifest):
        _read_all(paths)

    message = str(info.value)
    assert message.startswith(f"shard {paths[1]} is corrupt: the record at byte ")
    assert message.endswith(" fails its checksum; re-run `trainer prepare`")


def test_a_shard_cut_off_mid_record_is_named_by_its_size_or_else_by_its_framing(tmp_path):
    paths, manifest = _dataset_of(tmp_path)
    data = pathlib.Path(paths[0]).read_bytes()
    pathlib.Path(paths[0]).write_bytes(data[: len(data) - 100])  # inside the last record
    message = _data_loss_message(paths)

    by_size = pipeline.damaged_shard_error(message, str(tmp_path), manifest)
    manifest.shards["train"][0] = dataclasses.replace(manifest.shards["train"][0], bytes=len(data) - 100)
    by_framing = pipeline.damaged_shard_error(message, str(tmp_path), manifest)

    assert str(by_size) == (
        f"shard {paths[0]} has {len(data) - 100} bytes but the manifest says {len(data)} "
        "(truncated or replaced after `trainer prepare`); re-run `trainer prepare`"
    )
    assert re.fullmatch(
        rf"shard {re.escape(paths[0])} is corrupt: the record at byte \d+ is cut short; .*", str(by_framing)
    )


def test_a_data_loss_in_no_shard_of_the_dataset_keeps_tensorflows_error(tmp_path):
    _, manifest = _dataset_of(tmp_path)

    assert pipeline.damaged_shard_error("corrupted record at 120", str(tmp_path), manifest) is None
    with pytest.raises(tf.errors.DataLossError), pipeline.naming_damaged_shards(str(tmp_path), manifest):
        raise tf.errors.DataLossError(None, None, "corrupted record at 120")


# --------------------------------------------------------------------------- per-image ops


@pytest.mark.parametrize(
    ("shape", "fraction", "window"),
    [
        ((48, 64), 0.875, [3, 11, 42, 42]),
        ((64, 48), 0.875, [11, 3, 42, 42]),
        ((100, 100), 1.0, [0, 0, 100, 100]),
        ((10, 3), 0.5, [4, 1, 1, 1]),
        ((1, 1), 0.1, [0, 0, 1, 1]),  # never an empty window
    ],
)
def test_center_window(shape, fraction, window):
    result = pipeline.center_window(tf.constant(shape, tf.int32), fraction)

    assert result.numpy().tolist() == window


@pytest.mark.parametrize(("fmt", "tolerance"), [("png", 0.5), ("jpeg", 2.0)])
def test_decode_for_eval_is_the_resized_centre_crop(fmt, tolerance):
    pixels = gradient_image()
    encoded = encode(pixels, fmt)

    image = pipeline.decode_for_eval(tf.constant(encoded), IMAGE_SIZE, 0.875)

    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert image.dtype == tf.float32
    expected = reference_eval_image(pixels, IMAGE_SIZE, 0.875)
    assert np.abs(image.numpy() - expected).mean() < tolerance
    # The same-sized crop from the top-left corner is far off: the tolerance tells crops apart.
    corner = reference_eval_image(pixels, IMAGE_SIZE, 0.875, centred=False)
    assert np.abs(image.numpy() - corner).mean() > 4 * tolerance


def test_decode_for_eval_gives_the_same_pixels_for_jpeg_and_png_of_one_image():
    pixels = gradient_image(60, 40)

    jpeg = pipeline.decode_for_eval(tf.constant(encode(pixels, "jpeg")), IMAGE_SIZE, 0.5).numpy()
    png = pipeline.decode_for_eval(tf.constant(encode(pixels, "png")), IMAGE_SIZE, 0.5).numpy()

    assert np.abs(jpeg - png).mean() < 3.0


@pytest.mark.parametrize(
    ("window", "image_size", "ratio"),
    [([0, 0, 300, 300], 224, 1), ([0, 0, 300, 300], 150, 2), ([0, 0, 300, 300], 64, 4), ([0, 0, 300, 280], 32, 8)],
)
def test_jpeg_decode_scale_keeps_the_window_at_least_the_model_input(window, image_size, ratio):
    index = pipeline._jpeg_ratio_index(tf.constant(window), image_size)

    assert pipeline._JPEG_RATIOS[int(index)] == ratio


def test_a_large_jpeg_window_decoded_at_reduced_scale_shows_the_same_region():
    y, x = np.mgrid[0:400, 0:520]  # smooth gradients over a JPEG far larger than the model input
    pixels = np.stack([x * 255 // 519, y * 255 // 399, np.full_like(x, 80)], axis=-1).astype(np.uint8)
    encoded = tf.constant(encode(pixels, "jpeg"))
    top, left, side = 100, 60, 256

    window = tf.constant([top, left, side, side])

    image = pipeline.resize(pipeline.decode_window(encoded, tf.constant(True), window, 32), 32)  # 1/8 scale

    region = Image.fromarray(pixels[top : top + side, left : left + side])
    expected = np.asarray(region.resize((32, 32), Image.BOX), dtype=np.float32)
    assert np.abs(image.numpy() - expected).mean() < 2.0
    shifted = np.asarray(Image.fromarray(pixels[:side, :side]).resize((32, 32), Image.BOX), dtype=np.float32)
    assert np.abs(image.numpy() - shifted).mean() > 8.0


# --------------------------------------------------------------------------- datasets


def test_training_batches_have_static_shapes_and_one_hot_labels(shards, data_cfg):
    ds = pipeline.training_dataset(shards, data_cfg, NUM_CLASSES, batch_size=4, seed=7, deterministic=True)

    assert ds.element_spec[0].shape.as_list() == [4, IMAGE_SIZE, IMAGE_SIZE, 3]  # remainder dropped
    assert ds.element_spec[1].shape.as_list() == [4, NUM_CLASSES]
    batches = list(ds.take(4))  # 16 images from 10 records: the stream repeats
    for images, labels in batches:
        assert images.dtype == tf.float32
        np.testing.assert_array_equal(labels.numpy().sum(axis=1), np.ones(4))
        assert set(np.unique(labels.numpy())) <= {0.0, 1.0}
    # RGB pixels in [0, 255]: VGG16's preprocessing is the model's first layer, not the pipeline's.
    all_images = np.concatenate([b[0].numpy() for b in batches])
    assert all_images.min() >= 0 and all_images.max() <= 255 and all_images.max() > 100


def test_training_dataset_is_reproducible_per_seed(shards, data_cfg):
    def build(seed):
        return first_batch(
            pipeline.training_dataset(shards, data_cfg, NUM_CLASSES, batch_size=4, seed=seed, deterministic=True)
        )

    images_a, labels_a = build(3)
    images_b, labels_b = build(3)
    images_c, _ = build(4)

    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert not np.array_equal(images_a, images_c)


@pytest.mark.parametrize("flips", [False, True], ids=["no-flips", "flips-on"])
def test_training_without_random_crops_equals_full_square_centre_crop_flips_or_not(tmp_path, flips):
    """Flips on change nothing here: the model's step flips (trainer.model.Classifier), not the host."""
    cfg = DataConfig(
        image_size=IMAGE_SIZE,
        shuffle_buffer=1,
        augment=AugmentConfig(random_crop=False, horizontal_flip=flips, vertical_flip=flips),
    )
    single = write_shards(tmp_path, num_records=3, num_shards=1)
    full_square = DataConfig(image_size=IMAGE_SIZE, center_crop_fraction=1.0)
    evaluation, _ = first_batch(pipeline.evaluation_images(single, full_square, NUM_CLASSES).batch(3))

    batches = pipeline.training_dataset(single, cfg, NUM_CLASSES, 3, seed=0, deterministic=True).take(4)

    # shuffle_buffer=1 keeps record order: training then sees exactly the evaluation pixels, every pass.
    for images, _ in batches:
        np.testing.assert_allclose(images.numpy(), evaluation, atol=1e-4)
    assert pipeline.flips(cfg.augment) == (flips, flips)


def test_flips_left_right_unless_told_or_image_stats_say_otherwise():
    assert pipeline.flips(AugmentConfig()) == (True, False)  # auto without image stats: left-right on


def test_evaluation_images_keep_the_record_order(shards, data_cfg):
    elements = list(pipeline.evaluation_images(shards, data_cfg, NUM_CLASSES))

    labels = np.stack([label.numpy() for _, label in elements])
    assert labels.argmax(axis=1).tolist() == [i % NUM_CLASSES for i in range(10)]
    np.testing.assert_array_equal(labels.sum(axis=1), np.ones(10))
    assert all(image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) for image, _ in elements)


def test_padded_batches_are_full_and_weigh_the_padding_zero(shards, data_cfg):
    ds = pipeline.padded_batches(pipeline.evaluation_images(shards, data_cfg, NUM_CLASSES), batch=4, batches=4)

    batches = list(ds)

    assert [len(weights) for _, _, weights in batches] == [4, 4, 4, 4]  # 10 images, 6 zero-weight pads
    weights = np.concatenate([w.numpy() for _, _, w in batches])
    np.testing.assert_array_equal(weights, [1.0] * 10 + [0.0] * 6)
    padding = batches[-1][0].numpy()[2:]
    assert not padding.any()


def test_record_shares_split_the_records_of_all_files_exactly_once(shards, data_cfg):
    # 2 shard files among 3 workers: each reads both files and keeps every 3rd record.
    records = [sum(1 for _ in tf.data.TFRecordDataset(path)) for path in shards]
    shares = pipeline.evaluation_shares(shards, records, 3)

    def fingerprints(ds):  # an image's pixel sum and label identify its record here
        return [(round(float(image.numpy().sum()), 1), int(label.numpy().argmax())) for image, label in ds]

    seen = []
    for share in shares:
        own = fingerprints(pipeline.evaluation_images(share.files, data_cfg, NUM_CLASSES, share.stride, share.offset))
        assert len(own) == share.images
        seen.extend(own)

    everything = fingerprints(pipeline.evaluation_images(shards, data_cfg, NUM_CLASSES))
    assert len(set(everything)) == 10
    assert sorted(seen) == sorted(everything)
    assert [share.images for share in shares] == [4, 3, 3]


def test_evaluation_images_are_decode_for_eval_of_the_records(shards, data_cfg):
    first_record = next(iter(tf.data.TFRecordDataset(shards[0])))
    encoded = tf.io.parse_single_example(first_record, records.feature_spec())[records.ENCODED]

    images, _ = first_batch(pipeline.evaluation_images(shards, data_cfg, NUM_CLASSES).batch(4))

    expected = pipeline.decode_for_eval(encoded, IMAGE_SIZE, data_cfg.center_crop_fraction).numpy()
    np.testing.assert_allclose(images[0], expected, atol=1e-4)
