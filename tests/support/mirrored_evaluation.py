"""A program for tests/train/test_evaluation.py: exact evaluation under MirroredStrategy.

Two logical CPU devices stand in for a GPU node's two GPUs (they must be configured before
TensorFlow initialises, hence a process of its own). The model is the product's VGG16 with
oneDNN on, the kernels that fail on an empty batch on some CPUs. For each (images, batch) case
it prints one JSON line: the batch size every replica got at every step, what the evaluator
reported, and the same figures computed with numpy from one plain call of the model.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import tensorflow as tf

CASES = [(1, 2), (3, 2), (5, 4), (9, 4)]  # (images, batch per replica): every last batch is partial
SIZE, CLASSES = 32, 3


def main() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from trainer import model as model_lib
    from trainer.config import HeadConfig, ModelConfig
    from trainer.train.evaluation import Evaluator, exact_pass

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = model_lib.build_model(CLASSES, SIZE, ModelConfig(weights="none", head=HeadConfig(dense_units=[8])))
    evaluator = Evaluator(model)
    rng = np.random.default_rng(0)
    for images, batch in CASES:
        x = rng.uniform(0, 255, (images, SIZE, SIZE, 3)).astype(np.float32)
        y = np.eye(CLASSES, dtype=np.float32)[rng.integers(0, CLASSES, images)]
        elements = tf.data.Dataset.from_tensor_slices((x, y))
        data = exact_pass(strategy, "test", [images], batch, lambda _, elements=elements: elements)
        replica_batches = [
            [int(weights.shape[0]) for weights in strategy.experimental_local_results(step[2])] for step in data.dataset
        ]
        result = evaluator.run(data)
        probabilities = model(x, training=False).numpy()
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        print(
            json.dumps(
                {
                    "images": images,
                    "batch": batch,
                    "replicas": strategy.num_replicas_in_sync,
                    "replica_batches": replica_batches,
                    "reported": result,
                    "correct": int((probabilities.argmax(1) == y.argmax(1)).sum()),
                    "ambiguous": int((top2[:, 1] - top2[:, 0] < 1e-5).sum()),
                    "loss": float(-(y * np.log(np.clip(probabilities, 1e-7, 1.0))).sum(axis=1).mean()),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
