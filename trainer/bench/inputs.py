"""Input pipeline throughput (images/s) of four ways to feed 224x224 training images.

(a) ``flow_from_directory``: the notebook recipe this product replaces; Keras'
    ImageDataGenerator (horizontal flips, VGG16 ``preprocess_input``) read by one Python
    thread, which is how ``model.fit`` consumes it by default.
(b) ``image_dataset_from_directory``: Keras' tf.data loader (decode, squash-resize, batch).
(c) the product: :func:`trainer.data.pipeline.training_dataset` over the prepared TFRecord
    shards (shuffle, parallel reads, random crop decoded from the crop window, flip, resize).
(d) the limit: (c)'s own decode + crop + resize step alone, over JPEG bytes already in
    memory: no files, parsing, shuffling, flips or labels.

Each measurement makes a fresh iterator, discards ``warmup`` batches (start-up, autotuning,
buffers filling), then times ``batches`` batches. Methods alternate within every round, in
a rotated order, so load from other processes on the machine falls on all of them alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

BATCH = 32

METHODS = ("flow_from_directory", "image_dataset_from_directory", "tfrecord_pipeline", "decode_crop_resize_limit")


def measure(args: dict) -> dict:
    """Runs in a worker process pinned to ``args["cores"]`` cores."""
    makers = _iterator_makers(args)
    samples: dict[str, list[dict]] = {name: [] for name in METHODS}
    for round_index in range(args["rounds"]):
        shift = round_index % len(METHODS)
        for name in METHODS[shift:] + METHODS[:shift]:
            samples[name].append(time_batches(makers[name], args["warmup"], args["batches"]))
    return {
        "cores": args["cores"],
        "cpus": args.get("cpus"),
        "image_size": args["image_size"],
        "batch": BATCH,
        "images_per_measurement": args["batches"] * BATCH,
        "rounds": args["rounds"],
        "samples": samples,
    }


def time_batches(make_iterator: Callable[[], Iterator], warmup: int, batches: int) -> dict:
    """Images/s (wall clock) and CPU ms per image (all threads of this process) over ``batches`` batches."""
    iterator = make_iterator()
    for _ in range(warmup):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    del iterator  # stops a tf.data iterator's background threads before the next measurement
    images = batches * BATCH
    # cores_used < cores: the measurement did not get all its cores (other processes, or a serial stage).
    return {"images_per_second": images / wall, "cpu_ms_per_image": 1000 * cpu / images, "cores_used": cpu / wall}


def _iterator_makers(args: dict) -> dict[str, Callable[[], Iterator]]:
    image_dir, dataset_dir = args["image_dir"], args["dataset_dir"]
    size, cores = args["image_size"], args["cores"]
    jpegs = _read_jpegs(image_dir)
    return {
        "flow_from_directory": lambda: flow_from_directory(image_dir, size),
        "image_dataset_from_directory": lambda: iter(image_dataset_from_directory(image_dir, size, cores)),
        "tfrecord_pipeline": lambda: iter(tfrecord_pipeline(dataset_dir, size, cores)),
        "decode_crop_resize_limit": lambda: iter(decode_crop_resize_limit(jpegs, size, cores)),
    }


def flow_from_directory(image_dir: str, size: int) -> Iterator:
    from tf_keras.applications.vgg16 import preprocess_input
    from tf_keras.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(horizontal_flip=True, preprocessing_function=preprocess_input)
    return generator.flow_from_directory(
        image_dir, target_size=(size, size), batch_size=BATCH, class_mode="categorical", seed=0
    )


def image_dataset_from_directory(image_dir: str, size: int, cores: int):
    import tensorflow as tf
    import tf_keras as keras

    ds = keras.utils.image_dataset_from_directory(
        image_dir, label_mode="categorical", image_size=(size, size), batch_size=BATCH, seed=0
    )
    return _on_cores(ds.repeat().prefetch(tf.data.AUTOTUNE), cores)


def tfrecord_pipeline(dataset_dir: str, size: int, cores: int):
    from trainer.config import DataConfig
    from trainer.data import pipeline
    from trainer.data.manifest import read_manifest

    manifest = read_manifest(dataset_dir)
    files = pipeline.shard_paths(dataset_dir, manifest, "train")
    ds = pipeline.training_dataset(
        files, DataConfig(image_size=size), manifest.num_classes, BATCH, seed=0, deterministic=False
    )
    return _on_cores(ds, cores)


def decode_crop_resize_limit(jpegs: list[tuple[bytes, tuple[int, int]]], size: int, cores: int):
    """The product's decode + random crop + resize, and nothing else, over bytes in memory."""
    import tensorflow as tf

    from trainer.config import AugmentConfig
    from trainer.data import pipeline

    crop_area_min = AugmentConfig().crop_area_min
    encoded = tf.data.Dataset.from_tensor_slices(([j for j, _ in jpegs], [s for _, s in jpegs])).repeat()
    seeds = tf.data.Dataset.random(seed=0).batch(2, drop_remainder=True)

    def decode_crop_resize(inputs, seed):
        data, shape = inputs
        window = pipeline.random_window(shape, seed, crop_area_min)
        return pipeline.resize(pipeline.decode_window(data, tf.constant(True), window, size), size)

    ds = tf.data.Dataset.zip((encoded, seeds)).map(
        decode_crop_resize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False
    )
    return _on_cores(ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE), cores)


def _read_jpegs(image_dir: str) -> list[tuple[bytes, tuple[int, int]]]:
    from PIL import Image

    jpegs = []
    for root, _, names in sorted(os.walk(image_dir)):
        for name in sorted(names):
            path = os.path.join(root, name)
            with Image.open(path) as image:
                width, height = image.size
            with open(path, "rb") as fh:
                jpegs.append((fh.read(), (height, width)))
    return jpegs


def _on_cores(ds, cores: int):
    """tf.data work on a private pool of ``cores`` threads (the process is pinned to as many CPUs)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)
