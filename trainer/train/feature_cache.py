"""Feature caches: the frozen part of the model runs once per image, not once per epoch.

Whatever does not train in a phase is a fixed function of the image. Two cuts are cached:

- ``train.cache_frozen_features``: the whole base is frozen (feature extraction); the cut is
  after the base and the head's parameter-free pooling layer; the *top model* is the head.
- ``train.cache_frozen_blocks``: only a run of top blocks trains (fine tuning, block5 by
  default); the cut is the pooling layer of the block below them (``block4_pool``, 91% of
  VGG16's forward FLOPs below it at any input size); the top model is those blocks and the head.

A cached phase:

1. runs each of this worker's training images once through preprocessing and the frozen
   part, and the validation images likewise;
2. writes those features as fixed-length float32 records (features + label) to local
   scratch disk ($TRAINER_SCRATCH_DIR, else the system temp dir);
3. fits the top model, made of the model's own layers (shared weights), on them, read back
   with tf.data (shuffled each epoch, repeated), under the same strategy, callbacks, backups
   and step count;
4. deletes the files when the phase ends.

The full model then holds the trained weights: export, the next phase and the final
evaluation use the full model on images, unchanged.

Training images are cached as each image's centre crop by default (``train.cache_views: 0``):
a cache of one random crop per image would show the top model that single view every epoch.
With ``cache_views: N`` and ``data.augment`` on, the cache holds N augmented views of each
image (N times the disk and the first pass), and every epoch samples from all of them: more
views, closer to training on fresh augmentations. Validation features come from the
evaluation pipeline, so validation metrics equal the full model's on the images.

Multi-worker: each worker caches its own training shards (the files it would read anyway)
and the whole validation split, then validates its share of the cached records (every n-th),
exactly as on images (trainer.train.evaluation).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer import model as model_lib
from trainer.config import VGG16_BLOCKS, AugmentConfig, Config
from trainer.contract import Env
from trainer.data import pipeline
from trainer.data.manifest import Manifest, count_mismatch
from trainer.errors import ConfigError
from trainer.train.evaluation import EvaluationData, exact_pass

log = logging.getLogger(__name__)

_FLOAT_BYTES = 4
#: Images per batch of the one-off extraction pass.
EXTRACT_BATCH = 64


@dataclass
class FitInputs:
    """What a phase fits: the model itself on images, or its head on cached features."""

    model: keras.Model
    train_data: object
    validation: EvaluationData | None
    cut: str | None = None  # where the cached part ends (None: the phase trains on images)


#: The cut of the frozen-base cache: after the base and the head's parameter-free pooling layer.
HEAD_CUT = "head"


def cache_cut(model: keras.Model, cfg: Config, unfreeze_blocks: list[str]) -> str | None:
    """Where the fixed part of the model ends for this phase, or None when the phase is not cached.

    ``HEAD_CUT`` when the whole base is frozen (``train.cache_frozen_features``); the pooling
    layer of the block below the trained ones (``block4_pool`` when only block5 trains) when the
    phase trains a run of top blocks (``train.cache_frozen_blocks``).
    """
    if not unfreeze_blocks and not model_lib.base_of(model).trainable:
        return HEAD_CUT if cfg.train.cache_frozen_features else None
    if not cfg.train.cache_frozen_blocks:
        return None
    lowest = min(VGG16_BLOCKS.index(block) for block in unfreeze_blocks)
    if lowest == 0 or set(unfreeze_blocks) != set(VGG16_BLOCKS[lowest:]):
        return None  # every block trains, or the trained blocks leave a trainable gap below a frozen one
    return f"{VGG16_BLOCKS[lowest - 1]}_pool"


@contextlib.contextmanager
def fit_inputs(
    model: keras.Model,
    unfreeze_blocks: list[str],
    cfg: Config,
    dist,
    manifest: Manifest,
    train_files: list[str],
    global_batch: int,
    train_data,
    validation: EvaluationData | None,
) -> Iterator[FitInputs]:
    """The phase's fit inputs: cached features when the option is on and the base is frozen."""
    cut = cache_cut(model, cfg, unfreeze_blocks)
    if cut is None:
        yield FitInputs(model, train_data, validation)
        return
    directory = os.path.join(_scratch_root(), f"feature-cache-{uuid.uuid4().hex[:8]}")
    os.makedirs(directory)
    try:
        yield _cached_inputs(
            model, cut, cfg, dist, manifest, train_files, global_batch, directory, validation is not None
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _scratch_root() -> str:
    return os.environ.get(Env.SCRATCH_DIR.value) or tempfile.gettempdir()


# --------------------------------------------------------------------------- models


def split_at(model: keras.Model, cut: str) -> tuple[keras.Model, keras.Model]:
    """(extractor, top): images -> the output of the fixed part, and that output -> probabilities.

    For a block cut (``block4_pool``) the extractor runs preprocessing and the base up to the
    cut, and the top model the base's layers above it, then the head. Both call the model's
    own layers, so training the top model trains the model.
    """
    if cut == HEAD_CUT:
        return split_at_head(model)
    base = model_lib.base_of(model)
    lower = keras.Model(base.input, base.get_layer(cut).output, name="frozen_blocks")
    preprocessed = model.get_layer(model_lib.PREPROCESS_NAME).output
    extractor = keras.Model(model.input, lower(preprocessed), name="feature_extractor")
    features = keras.Input(lower.output.shape[1:], name="features")
    x = features
    base_names = [layer.name for layer in base.layers]
    for layer in base.layers[base_names.index(cut) + 1 :]:
        x = layer(x)
    names = [layer.name for layer in model.layers]
    for layer in model.layers[names.index(model_lib.BASE_NAME) + 1 :]:
        x = layer(x)
    return extractor, model_lib.Classifier(features, x, name="top")


def split_at_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(extractor, head): images -> pooled base features, and features -> probabilities.

    The cut is after the head's first layer (global-average pooling or flatten: no weights,
    deterministic), which makes the cached features 49x smaller with average pooling at
    224x224. The head model calls the model's own layers, so training it trains the model.
    """
    names = [layer.name for layer in model.layers]
    cut = names.index(model_lib.BASE_NAME) + 1
    extractor = keras.Model(model.input, model.layers[cut].output, name="feature_extractor")
    features = keras.Input(model.layers[cut].output.shape[1:], name="features")
    x = features
    for layer in model.layers[cut + 1 :]:
        x = layer(x)
    return extractor, model_lib.Classifier(features, x, name="head")


def compile_head(head: keras.Model, model: keras.Model, cfg: Config, strategy) -> None:
    """Compile the head like the phase compiled the model: same optimizer, loss and metric names."""
    with strategy.scope():
        head.compile(
            optimizer=model.optimizer,
            loss=model.loss,
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        # XLA compiles the step's compute only (trainer.model.Classifier): not its all-reduce.
        head.compile_compute = cfg.runtime.jit_compile


# --------------------------------------------------------------------------- cache files


@dataclass(frozen=True)
class CacheFile:
    """Fixed-length float32 records: the flattened features, then the label."""

    path: str
    feature_shape: tuple[int, ...]
    records: int

    @property
    def record_floats(self) -> int:
        return int(np.prod(self.feature_shape)) + 1

    def dataset(self, num_classes: int, batch: int, shuffle_buffer: int = 0, seed: int = 0) -> tf.data.Dataset:
        """Batches of (features, one-hot labels); shuffled and endless when ``shuffle_buffer`` is set."""
        ds = tf.data.FixedLengthRecordDataset(self.path, record_bytes=self.record_floats * _FLOAT_BYTES)
        if shuffle_buffer:
            ds = ds.shuffle(min(self.records, shuffle_buffer), seed=seed, reshuffle_each_iteration=True).repeat()
        ds = ds.batch(batch, drop_remainder=bool(shuffle_buffer))
        width, shape = self.record_floats - 1, self.feature_shape

        def decode(records: tf.Tensor):
            rows = tf.io.decode_raw(records, tf.float32)  # one op for the whole batch
            features = tf.reshape(rows[:, :width], (-1, *shape))
            return features, tf.one_hot(tf.cast(rows[:, width], tf.int32), num_classes)

        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    def elements(self, num_classes: int) -> tf.data.Dataset:
        """The records in file order, one (features, one-hot label) at a time."""
        return self.dataset(num_classes, EXTRACT_BATCH).unbatch()


def write_cache(extractor: keras.Model, images: tf.data.Dataset, path: str) -> CacheFile:
    """Run ``images`` (batches of (image, one-hot label)) through ``extractor`` into ``path``."""
    extract = tf.function(lambda batch: extractor(batch, training=False))
    feature_shape = tuple(extractor.output.shape[1:])
    records = 0
    with open(path, "wb") as fh:
        for batch, labels in images:
            features = extract(batch).numpy().astype(np.float32).reshape(len(labels), -1)
            label_column = labels.numpy().argmax(axis=1).astype(np.float32)[:, None]
            np.concatenate([features, label_column], axis=1).tofile(fh)
            records += len(labels)
    return CacheFile(path, feature_shape, records)


def check_disk_space(directory: str, images: int, feature_shape: tuple[int, ...]) -> None:
    needed = images * (int(np.prod(feature_shape)) + 1) * _FLOAT_BYTES
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise ConfigError(
            f"train.cache_frozen_features/cache_frozen_blocks: the feature cache needs {needed / 1e9:.1f} GB "
            f"({images} records of {'x'.join(map(str, feature_shape))} floats) in {directory} but only "
            f"{free / 1e9:.1f} GB are free; set $TRAINER_SCRATCH_DIR to a larger disk, lower train.cache_views, "
            "use model.head.pooling=avg (smaller frozen-base features) or turn the cache off"
        )


# --------------------------------------------------------------------------- the cached phase


def training_images(files: list[str], cfg: Config, num_classes: int, seed: int) -> tf.data.Dataset:
    """What a cache holds of this worker's training images: each image's centre crop once
    (``train.cache_views: 0``), or ``cache_views`` augmented views of each (as ``data.augment``
    sets them: random crop, flips), every pass over the files drawing new random views."""
    views = _views(cfg)
    if views == 0:
        return unaugmented_training_images(files, cfg, num_classes)
    return _decoded(files, cfg.data.image_size, cfg.data.augment, num_classes, passes=views, seed=seed)


def unaugmented_training_images(files: list[str], cfg: Config, num_classes: int) -> tf.data.Dataset:
    """This worker's training images once, in order, as the pipeline decodes them without augmentation."""
    plain = AugmentConfig(random_crop=False, horizontal_flip=False, vertical_flip=False)
    return _decoded(files, cfg.data.image_size, plain, num_classes, passes=1, seed=0)


def _decoded(
    files: list[str], image_size: int, augment: AugmentConfig, num_classes: int, passes: int, seed: int
) -> tf.data.Dataset:
    """``passes`` reads of ``files`` in order, decoded as training decodes them under ``augment``, in
    (image, one-hot label) batches; each record draws its own seed pair (unused without augmentation)."""
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 16)).repeat(passes)
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)

    def decode(serialized: tf.Tensor, seed_pair: tf.Tensor):
        encoded, label, shape, is_jpeg = pipeline.parse_with_shape(serialized)
        image = pipeline.decode_for_training(encoded, seed_pair, image_size, augment, shape, is_jpeg)
        return image, tf.one_hot(label, num_classes)

    ds = tf.data.Dataset.zip((ds, seeds)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(EXTRACT_BATCH).prefetch(tf.data.AUTOTUNE)


def _cached_inputs(model, cut, cfg, dist, manifest, train_files, global_batch, directory, validates) -> FitInputs:
    started = time.perf_counter()
    cluster = dist.cluster
    own = pipeline.shards_for_worker(train_files, cluster.num_workers, cluster.worker_index)
    own_images = _own_image_count(manifest, train_files, own)
    views = _views(cfg)
    with dist.strategy.scope():
        extractor, head = split_at(model, cut)
    feature_shape = tuple(extractor.output.shape[1:])
    check_disk_space(directory, own_images * max(views, 1) + manifest.split_size("validation"), feature_shape)
    num_classes = manifest.num_classes
    images = training_images(own, cfg, num_classes, seed=cfg.runtime.seed + cluster.worker_index)
    train_cache = write_cache(extractor, images, os.path.join(directory, "train.bin"))
    if train_cache.records != own_images * max(views, 1):  # free here; a short shard trains on fewer images
        raise count_mismatch(f"worker {cluster.worker_index}'s training shards", train_cache.records, own_images, own)
    validation = None
    if validates:
        validation_cache = write_cache(
            extractor, validation_images(cfg, manifest), os.path.join(directory, "validation.bin")
        )
        expected = manifest.split_size("validation")
        if validation_cache.records != expected:
            files = pipeline.shard_paths(cfg.data.dataset, manifest, "validation")
            raise count_mismatch("the validation shards", validation_cache.records, expected, files)
        validation = _cached_validation(dist, validation_cache, num_classes, cfg.train.batch_size_per_replica)
    compile_head(head, model, cfg, dist.strategy)
    train = _distributed_cache(dist.strategy, train_cache, num_classes, global_batch, cfg)
    log.info(
        "feature cache: %d training records (%s) and %d validation images through the frozen %s in %.1f s "
        "(features %s, %.1f MB in %s); %s trains on them",
        train_cache.records,
        f"{views} augmented views per image" if views else "centre crops",
        0 if validation is None else validation_cache.records,
        "base" if cut == HEAD_CUT else f"blocks up to {cut}",
        time.perf_counter() - started,
        "x".join(map(str, train_cache.feature_shape)),
        _size_mb(directory),
        directory,
        "the head" if cut == HEAD_CUT else "the blocks above and the head",
    )
    if _augments(cfg.data.augment) and not views:
        log.warning(
            "feature cache: training images are cached unaugmented, so this phase ignores data.augment "
            "(train.cache_views=N caches N augmented views per image)"
        )
    return FitInputs(head, train, validation, cut)


def _views(cfg: Config) -> int:
    """Augmented views per image the cache holds; 0: each image's centre crop, once."""
    return cfg.train.cache_views if _augments(cfg.data.augment) else 0


def validation_images(cfg: Config, manifest: Manifest) -> tf.data.Dataset:
    """The whole validation split in the evaluation pipeline's order, as (image, one-hot label) batches."""
    files = pipeline.shard_paths(cfg.data.dataset, manifest, "validation")
    return pipeline.evaluation_images(files, cfg.data, manifest.num_classes).batch(EXTRACT_BATCH)


def _cached_validation(dist, cache: CacheFile, num_classes: int, batch_per_replica: int) -> EvaluationData:
    """Every worker cached the whole split: worker i validates records i, i+n, i+2n, ..."""
    workers = dist.cluster.num_workers
    return exact_pass(
        dist.strategy,
        "validation",
        [len(range(i, cache.records, workers)) for i in range(workers)],
        batch_per_replica,
        lambda index: cache.elements(num_classes).shard(workers, index),
    )


def _distributed_cache(strategy, cache: CacheFile, num_classes: int, global_batch: int, cfg: Config):
    """Each worker reads its own cache file (its shards' features), like it reads its own shards."""

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = cache.dataset(
            num_classes,
            context.get_per_replica_batch_size(global_batch),
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.runtime.seed + context.input_pipeline_id,
        )
        off = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(pipeline.dataset_options(cfg.runtime.deterministic, off))

    return strategy.distribute_datasets_from_function(dataset_fn)


def _own_image_count(manifest: Manifest, files: list[str], own: list[str]) -> int:
    counts = dict(zip(files, (shard.records for shard in manifest.shards["train"]), strict=True))
    return sum(counts[f] for f in own)


def _augments(augment: AugmentConfig) -> bool:
    return augment.random_crop or augment.horizontal_flip or augment.vertical_flip


def _size_mb(directory: str) -> float:
    return sum(entry.stat().st_size for entry in os.scandir(directory)) / 1e6
