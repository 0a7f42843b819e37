"""Frozen-base feature cache (``train.cache_frozen_features``).

While the whole VGG16 base is frozen, every epoch would push every image through the same
fixed function. With the cache on, a phase whose base is frozen instead:

1. runs each of this worker's training images once through preprocessing, the base and
   the head's pooling layer (parameter-free), and the validation images likewise;
2. writes those features as fixed-length float32 records (features + label) to local
   scratch disk ($TRAINER_SCRATCH_DIR, else the system temp dir);
3. fits a *head model* made of the model's own head layers (shared weights) on them,
   read back with tf.data (shuffled each epoch, repeated), under the same strategy,
   callbacks and step count;
4. deletes the files when the phase ends.

The full model's head then holds the trained weights: export, the next phase and the
final evaluation use the full model on images, unchanged.

Training images are cached unaugmented (the centre square the pipeline uses without
augmentation): a cache of one random crop per image would show the head that single view
every epoch. So a cached phase trains without ``data.augment``; later phases that unfreeze
blocks (which are never cached) augment as configured. Validation features come from the
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
from trainer.config import AugmentConfig, Config
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
    cached: bool = False


def applies(model: keras.Model, cfg: Config, unfreeze_blocks: list[str]) -> bool:
    return cfg.train.cache_frozen_features and not unfreeze_blocks and not model_lib.base_of(model).trainable


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
    if not applies(model, cfg, unfreeze_blocks):
        yield FitInputs(model, train_data, validation)
        return
    directory = os.path.join(_scratch_root(), f"feature-cache-{uuid.uuid4().hex[:8]}")
    os.makedirs(directory)
    try:
        yield _cached_inputs(model, cfg, dist, manifest, train_files, global_batch, directory, validation is not None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _scratch_root() -> str:
    return os.environ.get(Env.SCRATCH_DIR.value) or tempfile.gettempdir()


# --------------------------------------------------------------------------- models


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
            f"train.cache_frozen_features: the cache needs {needed / 1e9:.1f} GB in {directory} but only "
            f"{free / 1e9:.1f} GB are free; set $TRAINER_SCRATCH_DIR to a larger disk, use "
            "model.head.pooling=avg (much smaller features) or turn the cache off"
        )


# --------------------------------------------------------------------------- the cached phase


def unaugmented_training_images(files: list[str], cfg: Config, num_classes: int) -> tf.data.Dataset:
    """This worker's training images once, in order, as the pipeline decodes them without augmentation."""
    plain = AugmentConfig(random_crop=False, horizontal_flip=False, vertical_flip=False)
    ds = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 16))

    def decode(serialized: tf.Tensor):
        encoded, label, shape, is_jpeg = pipeline.parse_with_shape(serialized)
        image = pipeline.decode_for_training(encoded, tf.constant([0, 0]), cfg.data.image_size, plain, shape, is_jpeg)
        return image, tf.one_hot(label, num_classes)

    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(EXTRACT_BATCH).prefetch(tf.data.AUTOTUNE)


def _cached_inputs(model, cfg, dist, manifest, train_files, global_batch, directory, validates) -> FitInputs:
    started = time.perf_counter()
    cluster = dist.cluster
    own = pipeline.shards_for_worker(train_files, cluster.num_workers, cluster.worker_index)
    own_images = _own_image_count(manifest, train_files, own)
    with dist.strategy.scope():
        extractor, head = split_at_head(model)
    check_disk_space(directory, own_images + manifest.split_size("validation"), tuple(extractor.output.shape[1:]))
    num_classes = manifest.num_classes
    train_cache = write_cache(
        extractor, unaugmented_training_images(own, cfg, num_classes), os.path.join(directory, "train.bin")
    )
    if train_cache.records != own_images:  # the count is free here; a short shard trains on fewer images
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
        "feature cache: %d training and %d validation images through the frozen base in %.1f s "
        "(features %s, %.1f MB in %s); the head trains on them",
        train_cache.records,
        0 if validation is None else validation_cache.records,
        time.perf_counter() - started,
        "x".join(map(str, train_cache.feature_shape)),
        _size_mb(directory),
        directory,
    )
    if _augments(cfg.data.augment):
        log.warning("feature cache: training images are cached unaugmented, so this phase ignores data.augment")
    return FitInputs(head, train, validation, cached=True)


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
