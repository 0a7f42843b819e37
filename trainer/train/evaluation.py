"""Exact evaluation under any strategy: every image counted once, no replica on an empty batch.

Keras' ``fit(validation_data=...)`` and ``evaluate`` hand tf.distribute a dataset whose last
batch is partial; tf.distribute splits it across replicas, and a replica (or a whole worker
whose shards ran out first) then computes on a zero-size batch, which TensorFlow's oneDNN
kernels reject on some CPUs (``input depth must be evenly divisible by filter depth``).
Keras' loss metric would also be wrong with padding: it averages per batch, weighted by
batch size, padding included.

So evaluation here is its own small loop. Every input pipeline yields the same number of full
batches of (image, label, weight) (``trainer.data.pipeline.padded_batches``); each replica
returns the weighted sums of loss, correct predictions and images; the strategy adds them over
all replicas and workers. The result is exact, and the image count is checked against what the
pass had to see. Validation during a phase is the ``Validation`` callback, which puts
``val_loss`` and ``val_accuracy`` into the epoch's logs for the callbacks after it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from trainer.config import Config
from trainer.data import pipeline
from trainer.data.manifest import Manifest
from trainer.errors import DataError


@dataclass
class EvaluationData:
    """One split, ready for exact passes under a strategy."""

    split: str
    dataset: object  # tf.distribute.DistributedDataset: per replica, full batches of (x, y, weight)
    steps: int  # steps of one whole pass
    images: int  # what a whole pass must count


def exact_input(
    split: str,
    images_per_pipeline: Sequence[int],
    replicas_in_sync: int,
    batch_per_replica: int,
    elements: Callable[[int], tf.data.Dataset],
) -> tuple[Callable[[tf.distribute.InputContext], tf.data.Dataset], int]:
    """(dataset_fn for ``distribute_datasets_from_function``, steps of one pass).

    ``elements(i)`` is input pipeline i's share of the split, ``images_per_pipeline[i]`` items.
    Every pipeline yields ``steps`` full batches per local replica.
    """
    pipelines = len(images_per_pipeline)
    replicas_per_pipeline = replicas_in_sync // pipelines
    steps = pipeline.evaluation_steps(images_per_pipeline, replicas_per_pipeline, batch_per_replica)

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        if context.num_input_pipelines != pipelines:
            raise RuntimeError(f"{split}: planned for {pipelines} input pipelines, got {context.num_input_pipelines}")
        batches = steps * replicas_per_pipeline  # each local replica takes one batch per step
        return pipeline.padded_batches(elements(context.input_pipeline_id), batch_per_replica, batches)

    return dataset_fn, steps


def exact_pass(
    strategy,
    split: str,
    images_per_pipeline: Sequence[int],
    batch_per_replica: int,
    elements: Callable[[int], tf.data.Dataset],
) -> EvaluationData:
    """A split's exact pass under ``strategy`` (see ``exact_input``)."""
    dataset_fn, steps = exact_input(
        split, images_per_pipeline, strategy.num_replicas_in_sync, batch_per_replica, elements
    )
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    return EvaluationData(split, dataset, steps, sum(images_per_pipeline))


def split_data(cfg: Config, strategy, num_workers: int, manifest: Manifest, split: str) -> EvaluationData | None:
    """The images of a prepared split, divided among the workers (None when the split is empty)."""
    if not manifest.has_split(split):
        return None
    files = pipeline.shard_paths(cfg.data.dataset, manifest, split)
    shares = pipeline.evaluation_shares(files, [s.records for s in manifest.shards[split]], num_workers)

    def elements(index: int) -> tf.data.Dataset:
        share = shares[index]
        return pipeline.evaluation_images(share.files, cfg.data, manifest.num_classes, share.stride, share.offset)

    images = [share.images for share in shares]  # their sum is the manifest's split size (Manifest.check)
    return exact_pass(strategy, split, images, cfg.train.batch_size_per_replica, elements)


class Evaluator:
    """Loss (the training loss: cross-entropy with the run's label smoothing) and accuracy of a model."""

    def __init__(self, model: keras.Model, label_smoothing: float = 0.0):
        self.model = model
        strategy = model.distribute_strategy

        def on_replica(images, labels, weights):
            probabilities = tf.cast(model(images, training=False), tf.float32)
            losses = keras.losses.categorical_crossentropy(labels, probabilities, label_smoothing=label_smoothing)
            correct = tf.cast(tf.equal(tf.argmax(labels, -1), tf.argmax(probabilities, -1)), tf.float32)
            return tf.stack([tf.reduce_sum(losses * weights), tf.reduce_sum(correct * weights), tf.reduce_sum(weights)])

        @tf.function
        def step(iterator):
            sums = strategy.run(on_replica, args=next(iterator))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

        self._step = step

    def run(self, data: EvaluationData, max_steps: int | None = None) -> dict[str, float]:
        """{"loss", "accuracy", "images"} over the whole split (or its first ``max_steps`` steps). Collective."""
        steps = min(data.steps, max_steps) if max_steps else data.steps
        iterator = iter(data.dataset)
        loss = correct = images = 0.0
        for _ in range(steps):
            sums = self._step(iterator).numpy()
            loss, correct, images = loss + float(sums[0]), correct + float(sums[1]), images + float(sums[2])
        if steps == data.steps and round(images) != data.images:
            raise DataError(
                f"the {data.split} split gave {round(images)} images but the manifest lists {data.images}; "
                "its shards do not match the manifest (damaged or replaced), re-run `trainer prepare`"
            )
        return {"loss": loss / max(images, 1.0), "accuracy": correct / max(images, 1.0), "images": round(images)}


class Validation(keras.callbacks.Callback):
    """Validates the fitted model at every epoch end; adds ``val_loss`` and ``val_accuracy`` to the logs.

    Must be the first callback: the others (best weights, early stopping, the metrics log,
    telemetry, TensorBoard) read the validation figures from the same logs.
    """

    def __init__(self, data: EvaluationData, label_smoothing: float, max_steps: int | None = None):
        super().__init__()
        self.data, self.label_smoothing, self.max_steps = data, label_smoothing, max_steps
        self._evaluator: Evaluator | None = None

    def on_train_begin(self, logs=None):
        self._evaluator = Evaluator(self.model, self.label_smoothing)  # the fitted model (maybe the cached head)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        result = self._evaluator.run(self.data, self.max_steps)
        logs["val_loss"], logs["val_accuracy"] = result["loss"], result["accuracy"]
