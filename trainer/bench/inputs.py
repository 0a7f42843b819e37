"""Input pipeline throughput (images/s) and CPU cost of the ways to feed 224x224 training images.

(a) ``flow_from_directory``: the notebook recipe this product replaces; Keras'
    ImageDataGenerator (horizontal flips, VGG16 ``preprocess_input``) read by one Python
    thread, which is how ``model.fit`` consumes it by default.
(b) ``image_dataset_from_directory``: Keras' tf.data loader (read files, decode, squash-resize, batch).
(c) the product: :func:`trainer.data.pipeline.training_dataset` over the prepared TFRecord
    shards (shuffle, parallel reads, random crop decoded from the crop window, resize; its
    random flips are the model's, on the device).
(d) the limit: the fastest way this machine turns the stored bytes into the training tensor,
    whatever the decode path. The stored bytes are the images (c) reads: what `trainer prepare`
    wrote into the training shards (by default scaled down to a 256 px shorter side,
    trainer.data.scale). The candidates are (b) itself over the source folder, and four decoders
    over those stored bytes already in memory (no files, parsing, shuffling, flips or labels): full decode + resize,
    full decode with libjpeg's fast integer DCT + resize, DCT-scaled decode (1/2, 1/4, 1/8 when
    the image is at least twice the output) + resize, and (c)'s own crop-window decode + resize.
    The limit is the candidate with the highest median (trainer.bench.suite).

Each measurement makes a fresh iterator, discards ``warmup`` batches (start-up, autotuning,
buffers filling), then times ``batches`` batches, and records the load it ran under
(trainer.bench.rounds). Every round measures every method once, in a rotated order, so drift
of the machine falls on all of them alike; rounds go on until ``min_rounds`` had no busy
measurement, or ``max_rounds`` ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from trainer.bench import rounds

BATCH = 32

#: Limit candidates over bytes in memory; (b) is a limit candidate too.
IN_MEMORY_DECODERS = ("decode_resize", "decode_fast_dct_resize", "decode_scaled_resize", "decode_crop_resize")
LIMIT_CANDIDATES = ("image_dataset_from_directory", *IN_MEMORY_DECODERS)
METHODS = ("flow_from_directory", "image_dataset_from_directory", "tfrecord_pipeline", *IN_MEMORY_DECODERS)


def measure(args: dict) -> dict:
    """Runs in a worker process pinned to ``args["cores"]`` cores."""
    makers = _iterator_makers(args)

    def one(name: str) -> dict:
        return rounds.measured(lambda: time_batches(makers[name], args["warmup"], args["batches"]), args["cores"])

    samples = rounds.run_rounds(one, METHODS, args["min_rounds"], args["max_rounds"])
    return {
        "cores": args["cores"],
        "cpus": args.get("cpus"),
        "image_size": args["image_size"],
        "batch": BATCH,
        "images_per_measurement": args["batches"] * BATCH,
        "rounds": len(samples[METHODS[0]]),
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
    jpegs = stored_images(dataset_dir)
    makers = {
        "flow_from_directory": lambda: flow_from_directory(image_dir, size),
        "image_dataset_from_directory": lambda: iter(image_dataset_from_directory(image_dir, size, cores)),
        "tfrecord_pipeline": lambda: iter(tfrecord_pipeline(dataset_dir, size, cores)),
    }
    for name in IN_MEMORY_DECODERS:
        makers[name] = lambda name=name: iter(in_memory_decoder(name, jpegs, size, cores))
    return makers


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


def in_memory_decoder(name: str, jpegs: list[tuple[bytes, tuple[int, int]]], size: int, cores: int):
    """Batches of ``size`` x ``size`` float32 images from JPEG bytes in memory, decoded the ``name`` way."""
    import tensorflow as tf

    encoded = tf.data.Dataset.from_tensor_slices(([j for j, _ in jpegs], [s for _, s in jpegs])).repeat()
    seeds = tf.data.Dataset.random(seed=0).batch(2, drop_remainder=True)
    decode = _decoders(size)[name]
    ds = tf.data.Dataset.zip((encoded, seeds)).map(
        lambda inputs, seed: decode(inputs[0], inputs[1], seed),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    return _on_cores(ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE), cores)


def _decoders(size: int) -> dict[str, Callable]:
    """name -> (jpeg bytes, [height, width], seed) -> the training tensor of one image."""
    import tensorflow as tf

    from trainer.config import AugmentConfig
    from trainer.data import pipeline

    crop_area_min = AugmentConfig().crop_area_min
    yes = tf.constant(True)

    def whole(shape):
        return tf.stack([0, 0, shape[0], shape[1]])

    return {
        "decode_resize": lambda data, shape, seed: pipeline.resize(tf.io.decode_jpeg(data, channels=3), size),
        "decode_fast_dct_resize": lambda data, shape, seed: pipeline.resize(
            tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_FAST"), size
        ),
        "decode_scaled_resize": lambda data, shape, seed: pipeline.resize(
            pipeline.decode_window(data, yes, whole(shape), size), size
        ),
        "decode_crop_resize": lambda data, shape, seed: pipeline.resize(
            pipeline.decode_window(data, yes, pipeline.random_window(shape, seed, crop_area_min), size), size
        ),
    }


def stored_images(dataset_dir: str) -> list[tuple[bytes, tuple[int, int]]]:
    """(encoded bytes, (height, width)) of every training record, as `trainer prepare` stored them."""
    import tensorflow as tf

    from trainer.data import pipeline
    from trainer.data.manifest import read_manifest

    found = []
    for path in pipeline.shard_paths(dataset_dir, read_manifest(dataset_dir), "train"):
        for serialized in tf.data.TFRecordDataset(path):
            encoded, _, shape, _ = pipeline.parse_with_shape(serialized)
            found.append((encoded.numpy(), (int(shape[0]), int(shape[1]))))
    return found


def _on_cores(ds, cores: int):
    """tf.data work on a private pool of ``cores`` threads (the process is pinned to as many CPUs)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)
