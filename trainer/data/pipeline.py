"""The tf.data input pipeline: TFRecord shards -> batched RGB images for the model.

Training: the worker's own shards, shuffled, read in parallel (interleave), parsed,
decoded with a random crop (JPEGs decode only the crop window, at reduced scale when it
is much larger than the model input), resized, batched with the remainder dropped,
one-hot labelled per batch, prefetched. Random flips and VGG16's mean subtraction happen
in the model, on the device (trainer.model.Classifier, VGG16Preprocess).
Evaluation: every image of the split exactly once across the workers, centre crop, in full
batches padded with zero-weight images (no replica ever gets an empty batch; see below).

Random augmentation uses stateless ops seeded from a per-record seed stream, so with
``runtime.deterministic`` the whole pipeline is reproducible.

A shard TensorFlow cannot read (``DataLossError: corrupted record at N``, which names no file)
is named by :func:`naming_damaged_shards`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import tensorflow as tf

from trainer import storage
from trainer.config import AugmentConfig, DataConfig
from trainer.data import records
from trainer.data.manifest import SPLITS, Manifest, check_shard_sizes
from trainer.data.stats import default_horizontal_flip, default_random_crop
from trainer.errors import DataError

AUTOTUNE = tf.data.AUTOTUNE


# --------------------------------------------------------------------------- shards


def shard_paths(dataset_dir: str, manifest: Manifest, split: str) -> list[str]:
    return [storage.join(dataset_dir, shard.path) for shard in manifest.shards.get(split, [])]


def shards_for_worker(paths: Sequence[str], num_workers: int, worker_index: int, split: str = "train") -> list[str]:
    """Round-robin file sharding: worker i reads shards i, i+n, i+2n, ...

    Every worker needs at least one shard, otherwise it has nothing to train on while its
    peers wait for it in the all-reduce.
    """
    if len(paths) < num_workers:
        raise DataError(
            f"split {split!r} has {len(paths)} shard(s) but the run has {num_workers} workers; "
            f"re-run `trainer prepare` with --set prepare.min_shards={num_workers * 4} (or more) or use fewer workers"
        )
    return list(paths[worker_index::num_workers])


# --------------------------------------------------------------------------- damaged shards

_DAMAGE = re.compile(r"(?:corrupted|truncated) record at (\d+)")


@contextlib.contextmanager
def naming_damaged_shards(dataset_dir: str, manifest: Manifest) -> Iterator[None]:
    """Turn TensorFlow's ``DataLossError`` while reading the dataset into a DataError naming the shard."""
    try:
        yield
    except tf.errors.DataLossError as err:
        named = damaged_shard_error(str(err), dataset_dir, manifest)
        if named is None:
            raise  # not a shard of this dataset (trainer.exits.classify still gives it one line)
        raise named from None


def damaged_shard_error(message: str, dataset_dir: str, manifest: Manifest) -> DataError | None:
    """The DataError naming the shard that TensorFlow's ``message`` is about; None when none is damaged.

    Run only after a read failed. First each shard's size against the manifest (one stat per
    shard: finds truncated and replaced shards); then, for the shards longer than the offset in
    the message, the record framing up to that offset (:func:`records.damage_at`). Both look at
    every split's shards, so the caller need not know which split was being read.
    """
    match = _DAMAGE.search(message)
    if match is None:
        return None
    try:
        check_shard_sizes(dataset_dir, manifest)  # the same check as preflight's: a shard changed since
    except DataError as err:
        return err
    shards = [(storage.join(dataset_dir, s.path), s.bytes) for split in SPLITS for s in manifest.shards.get(split, [])]
    offset = int(match.group(1))
    for path, size in shards:
        if size > offset:
            with tf.io.gfile.GFile(path, "rb") as fh:
                damage = records.damage_at(fh, offset)
            if damage:
                return DataError(f"shard {path} is corrupt: {damage}; re-run `trainer prepare`")
    return None


# --------------------------------------------------------------------------- per-image ops
#
# The pipeline hands the model resized RGB pixels in [0, 255] (float32). VGG16's own
# preprocessing (RGB -> BGR, minus the ImageNet means) is the model's first layer
# (trainer.model.VGG16Preprocess): two more passes over every pixel cost the input pipeline
# about a quarter of its throughput on the host CPU, the usual bottleneck, while on a GPU
# they are nearly free.

#: JPEG decoders scale by 1/2, 1/4 or 1/8 in the DCT domain, skipping most of the work.
_JPEG_RATIOS = (1, 2, 4, 8)


def _image_shape(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) of an encoded image; reads only the header for JPEGs."""
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.image.extract_jpeg_shape(encoded)[:2],
        lambda: tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))[:2],
    )


def _jpeg_ratio_index(window: tf.Tensor, image_size: int) -> tf.Tensor:
    """Index in _JPEG_RATIOS of the largest scale-down that keeps the window >= image_size per side."""
    shorter = tf.minimum(window[2], window[3])
    return tf.add_n([tf.cast(shorter >= ratio * image_size, tf.int32) for ratio in _JPEG_RATIOS[1:]])


def decode_window(encoded: tf.Tensor, is_jpeg: tf.Tensor, window: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode only ``window`` = [y, x, height, width] of the image, as uint8 RGB.

    JPEGs skip the pixels outside the window, and when the window is at least twice
    ``image_size`` per side they decode at 1/2, 1/4 or 1/8 scale (which also filters out
    the aliasing a large bilinear downscale would add). One ``switch_case`` picks the
    decoder, so each image pays for a single branch op.
    """

    def jpeg(ratio: int):
        return lambda: tf.image.decode_and_crop_jpeg(encoded, window // ratio, channels=3, ratio=ratio)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])

    branch = tf.where(is_jpeg, 1 + _jpeg_ratio_index(window, image_size), 0)
    return tf.switch_case(branch, [other] + [jpeg(ratio) for ratio in _JPEG_RATIOS])


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 crop -> float32 RGB in [0, 255], image_size x image_size (bilinear)."""
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    image.set_shape((image_size, image_size, 3))
    return image


def center_window(shape: tf.Tensor, fraction: float) -> tf.Tensor:
    """The central square covering ``fraction`` of the shorter side."""
    side = tf.cast(tf.cast(tf.reduce_min(shape), tf.float32) * fraction, tf.int32)
    side = tf.maximum(side, 1)
    offset_y = (shape[0] - side) // 2
    offset_x = (shape[1] - side) // 2
    return tf.stack([offset_y, offset_x, side, side])


def random_window(shape: tf.Tensor, seed: tf.Tensor, crop_area_min: float) -> tf.Tensor:
    """An Inception-style random crop window: 3/4..4/3 aspect ratio, crop_area_min..1 of the area."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [3]], axis=0),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(crop_area_min, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])


def decode_for_eval(encoded: tf.Tensor, image_size: int, center_fraction: float) -> tf.Tensor:
    """Encoded JPEG/PNG bytes -> centre-cropped, resized float32 RGB image in [0, 255].

    Used by the evaluation pipeline and by the exported model's serving signature, so
    training-time evaluation and serving see identical pixels.
    """
    shape = _image_shape(encoded)
    window = center_window(shape, center_fraction)
    return resize(decode_window(encoded, tf.io.is_jpeg(encoded), window, image_size), image_size)


def decode_for_training(
    encoded: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    augment: AugmentConfig,
    shape: tf.Tensor | None = None,
    is_jpeg: tf.Tensor | None = None,
) -> tf.Tensor:
    """Encoded bytes -> an augmented float32 RGB training image in [0, 255].

    ``shape`` and ``is_jpeg`` come from the record when known (no header parsing then).
    Flips, when ``augment`` has them, act on the uint8 crop before resizing (fewer bytes than
    the float output; bilinear resizing commutes with mirroring). The training pipeline passes
    none (the model flips); the feature cache's augmented views, which never reach the model's
    step, do.
    """
    shape = _image_shape(encoded) if shape is None else shape
    is_jpeg = tf.io.is_jpeg(encoded) if is_jpeg is None else is_jpeg
    # auto (None) here means no image stats: a run decides it from them first (trainer.train.plan).
    random_crop = default_random_crop(image_size) if augment.random_crop is None else augment.random_crop
    window = random_window(shape, seed, augment.crop_area_min) if random_crop else center_window(shape, 1.0)
    image = decode_window(encoded, is_jpeg, window, image_size)
    left_right, up_down = flips(augment)
    if left_right:
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    if up_down:
        image = tf.image.stateless_random_flip_up_down(image, seed=seed + 2)
    return resize(image, image_size)


def flips(augment: AugmentConfig) -> tuple[bool, bool]:
    """(left-right, up-down): the random flips ``augment`` asks for (auto without image stats: on)."""
    left_right = default_horizontal_flip(None) if augment.horizontal_flip is None else augment.horizontal_flip
    return bool(left_right), bool(augment.vertical_flip)


def without_flips(augment: AugmentConfig) -> AugmentConfig:
    """``augment`` minus its flips: what the training pipeline does when the model's step flips."""
    return augment.model_copy(update={"horizontal_flip": False, "vertical_flip": False})


def _parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    features = tf.io.parse_single_example(serialized, records.feature_spec())
    return features[records.ENCODED], features[records.LABEL]


def parse_with_shape(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(encoded, label, [height, width], is_jpeg) from a record; `prepare` wrote the true shape."""
    features = tf.io.parse_single_example(serialized, records.feature_spec())
    shape = tf.cast(tf.stack([features[records.HEIGHT], features[records.WIDTH]]), tf.int32)
    return features[records.ENCODED], features[records.LABEL], shape, tf.equal(features[records.FORMAT], b"jpeg")


# --------------------------------------------------------------------------- datasets


def dataset_options(deterministic: bool, shard_policy: tf.data.experimental.AutoShardPolicy) -> tf.data.Options:
    """Options of the datasets the trainer feeds to a model (``shard_policy``: OFF where it shards itself)."""
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_distribute.auto_shard_policy = shard_policy
    return options


def _read(
    files: Sequence[str], cfg: DataConfig, deterministic: bool, shuffle_seed: int | None, stager=None
) -> tf.data.Dataset:
    if stager is not None:
        # Re-evaluated every epoch: a shard is read from its local copy once that is complete.
        files_ds = tf.data.Dataset.from_generator(stager.paths, output_signature=tf.TensorSpec([], tf.string))
    else:
        files_ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle_seed is not None:
        files_ds = files_ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    parallel = cfg.read_parallelism or AUTOTUNE
    return files_ds.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), cfg.read_parallelism or 16),
        num_parallel_calls=parallel,
        deterministic=deterministic,
    )


def training_dataset(
    files: Sequence[str],
    cfg: DataConfig,
    num_classes: int,
    batch_size: int,
    seed: int,
    deterministic: bool,
    stager=None,
    probe=None,
) -> tf.data.Dataset:
    """An endless stream of augmented training batches from this worker's ``files``.

    ``stager`` (a :class:`trainer.data.staging.ShardStager` over the same files) makes
    later epochs read local copies. ``probe`` (a :class:`trainer.train.telemetry.StepProbe`)
    stamps each batch as it leaves the pipeline, with the bytes of its records.
    """
    ds = _read(files, cfg, deterministic, shuffle_seed=seed, stager=stager)
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # One independent seed pair per record drives the stateless augmentation ops.
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    ds = tf.data.Dataset.zip((ds, seeds))

    # Random flips are the model's (trainer.model.Classifier, on the device): here they would copy every crop
    # once more on the host, 7% of an image's CPU time at 224 px (measured), for what a GPU does for nothing.
    augment = without_flips(cfg.augment)

    def _train_example(serialized: tf.Tensor, seed_pair: tf.Tensor):
        encoded, label, shape, is_jpeg = parse_with_shape(serialized)
        image = decode_for_training(encoded, seed_pair, cfg.image_size, augment, shape, is_jpeg)
        if probe is None:
            return image, label
        return image, label, tf.cast(tf.strings.length(serialized), tf.int64) + records.FRAMING_BYTES

    def _one_hot(image, label, *record_bytes):
        return (image, tf.one_hot(label, num_classes), *record_bytes)

    ds = ds.map(_train_example, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    # One-hot once per batch, not per image: every op in the per-image map costs the input pipeline
    # its dispatch (about 4% of an image's CPU time at 224 px on one core, measured).
    ds = ds.batch(batch_size, drop_remainder=True).map(_one_hot)
    ds = ds.prefetch(cfg.prefetch_batches or AUTOTUNE)
    if probe is not None:
        ds = probe.stamp_dataset(ds)
    return ds.with_options(dataset_options(deterministic, tf.data.experimental.AutoShardPolicy.OFF))


def stall_after(ds: tf.data.Dataset, batches: int) -> tf.data.Dataset:
    """Test hook (``$TRAINER_TEST_STALL_INPUT_AFTER``): pass ``batches`` batches, then block forever.

    The process stays alive and keeps heartbeating; it just never reaches the next collective.
    """
    import logging
    import time

    def _block(index):
        logging.getLogger(__name__).warning("test hook: training input stalled after %d batches", batches)
        while True:
            time.sleep(3600)

    def _gate(index, batch):
        waited = tf.cond(index < batches, lambda: index, lambda: tf.py_function(_block, [index], tf.int64))
        with tf.control_dependencies([waited]):
            return tf.nest.map_structure(tf.identity, batch)

    return ds.enumerate().map(_gate)


# --------------------------------------------------------------------------- exact evaluation
#
# An evaluation pass must count every image exactly once, and no replica may ever compute on
# an empty batch: TensorFlow's oneDNN kernels (the default on x86) fail on zero-size inputs,
# and tf.distribute hands a replica an empty batch whenever its worker runs out of data
# before its peers (uneven shards, or the last partial batch split across replicas).
# So every input pipeline of an evaluation yields the same number of *full* batches of
# (image, label, weight): its share of the split with weight 1, then zero-weight padding.
# Sums weighted that way are exact; the padding costs at most one global batch per pass.


@dataclass(frozen=True)
class EvalShare:
    """What one input pipeline (worker) evaluates of a split.

    Whole files when the split has a shard for every pipeline (no byte is read twice);
    otherwise every ``stride``-th record of all files, from ``offset`` (each pipeline reads
    the whole split and decodes only its own records).
    """

    files: tuple[str, ...]
    images: int
    stride: int = 1
    offset: int = 0


def evaluation_shares(paths: Sequence[str], records: Sequence[int], num_pipelines: int) -> list[EvalShare]:
    """Divide a split's shards (with their record counts, from the manifest) among the pipelines."""
    if len(paths) >= num_pipelines:
        return [EvalShare(tuple(paths[i::num_pipelines]), sum(records[i::num_pipelines])) for i in range(num_pipelines)]
    total = sum(records)
    return [
        EvalShare(tuple(paths), len(range(i, total, num_pipelines)), num_pipelines, i) for i in range(num_pipelines)
    ]


def evaluation_steps(images_per_pipeline: Sequence[int], replicas_per_pipeline: int, batch_per_replica: int) -> int:
    """Steps of one pass: enough for the largest share, with one full batch per replica per step."""
    per_step = replicas_per_pipeline * batch_per_replica
    return max(-(-images // per_step) for images in images_per_pipeline)


def padded_batches(elements: tf.data.Dataset, batch: int, batches: int) -> tf.data.Dataset:
    """(x, y) elements -> exactly ``batches`` full batches of (x, y, weight), ready to distribute.

    The elements get weight 1; zero-weight padding (zeros of the same shape) fills up the
    rest. ``elements`` must not hold more than ``batch * batches`` items (callers size it
    from the manifest; a surplus would be cut, and the image count check reports it).
    The caller shards (one dataset per input pipeline), so tf.distribute must not.
    """
    x_spec, y_spec = elements.element_spec
    real = elements.map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros(x_spec.shape, x_spec.dtype), tf.zeros(y_spec.shape, y_spec.dtype), tf.constant(0.0))
    ).repeat()
    ds = real.concatenate(padding).take(batch * batches).batch(batch, drop_remainder=True).prefetch(AUTOTUNE)
    return ds.with_options(dataset_options(True, tf.data.experimental.AutoShardPolicy.OFF))


def labelled_records(files: Sequence[str], stride: int = 1, offset: int = 0) -> tf.data.Dataset:
    """(encoded bytes, label, source path) of ``files`` in the fixed order of ``evaluation_images``."""
    spec = {**records.feature_spec(), records.SOURCE: tf.io.FixedLenFeature([], tf.string, default_value="")}
    ds = _read(files, DataConfig(), deterministic=True, shuffle_seed=None)
    if stride > 1:
        ds = ds.shard(stride, offset)

    def _fields(serialized: tf.Tensor):
        features = tf.io.parse_single_example(serialized, spec)
        return features[records.ENCODED], features[records.LABEL], features[records.SOURCE]

    return ds.map(_fields, num_parallel_calls=AUTOTUNE)


def evaluation_images(
    files: Sequence[str], cfg: DataConfig, num_classes: int, stride: int = 1, offset: int = 0
) -> tf.data.Dataset:
    """The images of ``files`` in a fixed order (centre crops), every ``stride``-th from ``offset``."""
    ds = _read(files, cfg, deterministic=True, shuffle_seed=None)  # the order defines the record shares
    if stride > 1:
        ds = ds.shard(stride, offset)

    def _eval_example(serialized: tf.Tensor):
        encoded, label = _parse(serialized)
        return decode_for_eval(encoded, cfg.image_size, cfg.center_crop_fraction), tf.one_hot(label, num_classes)

    return ds.map(_eval_example, num_parallel_calls=AUTOTUNE)
