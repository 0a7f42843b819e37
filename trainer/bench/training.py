"""Training throughput: steps fed by the product's input pipeline vs by tensors in memory.

The model and step are the product's own (build_model, then the fine-tuning phase's
compile: block5 and the head trainable, SGD with momentum), at the benchmark's small model
input so a step takes a fraction of a second on CPU cores. The synthetic feed repeats one
real batch held in memory: the same pixels and shapes, zero input cost, so it measures the
compute limit. The real feed decodes the benchmark's JPEGs from TFRecord shards that
`trainer prepare` wrote for the model input (shorter side 8/7 of it, trainer.data.scale), on
the same cores the step uses, which is what a worker does.

Fresh iterators per measurement and warm-up steps keep the comparison fair: while one feed
is timed, the other has no background threads. Feeds alternate in rounds, each measurement
with the load it ran under (trainer.bench.rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from trainer.bench import rounds

FEEDS = ("synthetic", "pipeline")


def measure(args: dict) -> dict:
    import tensorflow as tf

    from trainer.config import config_from_dict
    from trainer.data import pipeline
    from trainer.data.manifest import read_manifest
    from trainer.model import build_model
    from trainer.train.phases import compile_for_phase, plan_phase

    size, batch = args["image_size"], args["batch"]
    cfg = config_from_dict(
        {"model": {"weights": "none"}, "data": {"image_size": size}, "train": {"batch_size_per_replica": batch}}
    )
    manifest = read_manifest(args["dataset_dir"])
    files = pipeline.shard_paths(args["dataset_dir"], manifest, "train")
    model = build_model(manifest.num_classes, size, cfg.model, seed=0)
    plan = plan_phase("fine_tuning", cfg, steps_per_epoch=1000, global_batch=batch, first_step=0)
    compile_for_phase(model, plan, cfg, tf.distribute.get_strategy())
    step = model.make_train_function()

    def real() -> Iterator:
        ds = pipeline.training_dataset(files, cfg.data, manifest.num_classes, batch, seed=0, deterministic=False)
        return iter(ds)

    in_memory = next(real())
    feeds = {"pipeline": real, "synthetic": lambda: iter(tf.data.Dataset.from_tensors(in_memory).repeat())}

    def one(name: str) -> dict:
        return rounds.measured(lambda: images_per_second(step, feeds[name], args["warmup"], args["steps"], batch))

    samples = rounds.run_rounds(one, FEEDS, args["min_rounds"], args["max_rounds"])
    return {
        "image_size": size,
        "batch": batch,
        "phase": "fine_tuning (block5 + head trainable)",
        "steps_per_measurement": args["steps"],
        "rounds": len(samples[FEEDS[0]]),
        "samples": samples,
    }


def images_per_second(step, make_iterator: Callable[[], Iterator], warmup: int, steps: int, batch: int) -> dict:
    iterator = make_iterator()
    for _ in range(warmup):
        step(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        logs = step(iterator)
    float(logs["loss"])  # the step's result is ready: the time covers the whole computation
    seconds = time.perf_counter() - started
    del iterator
    return {"images_per_second": steps * batch / seconds}
