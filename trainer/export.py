"""Export a trained classifier for serving.

Writes, under ``<output.dir>/export``:
- ``saved_model/``: a SavedModel whose ``serving_default`` signature takes encoded
  JPEG/PNG bytes and returns class probabilities, the top class index and its label;
  decoding, centre crop, resize and VGG16 preprocessing run inside the graph, identical
  to evaluation during training.
- ``model.keras``: the Keras model (for further training or inspection); its first layer is
  :class:`trainer.model.VGG16Preprocess`, so ``import trainer.model`` before loading it.
- ``labels.txt``: class names in label order.
"""

from __future__ import annotations

import logging
import os
import tempfile

import tensorflow as tf
import tf_keras as keras

from trainer import storage
from trainer.data.pipeline import decode_for_eval
from trainer.layout import RunLayout

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_NAME = "image_bytes"
OUTPUT_NAME = "probabilities"


class ServingModule(tf.Module):
    def __init__(self, model: keras.Model, class_names: list[str], image_size: int, center_fraction: float):
        super().__init__()
        self.model = model
        self.labels = tf.constant(class_names)
        self.image_size = image_size
        self.center_fraction = center_fraction

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    def serve(self, image_bytes):
        images = tf.map_fn(
            lambda encoded: decode_for_eval(encoded, self.image_size, self.center_fraction),
            image_bytes,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        probabilities = tf.cast(self.model(images, training=False), tf.float32)
        top = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_index": top,
            "label": tf.gather(self.labels, top),
            "score": tf.reduce_max(probabilities, axis=-1),
        }


def export_model(
    model: keras.Model, class_names: list[str], image_size: int, center_fraction: float, layout: RunLayout
) -> dict[str, str]:
    """Write the SavedModel, the Keras file and the labels; returns their locations.

    Written to a local temporary directory first and then copied, so the same code
    serves local paths and object stores.
    """
    module = ServingModule(model, class_names, image_size, center_fraction)
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved_model")
        tf.saved_model.save(module, saved, signatures={SIGNATURE: module.serve})
        keras_file = os.path.join(tmp, "model.keras")
        model.save(keras_file)
        storage.upload_tree(saved, layout.saved_model)
        storage.copy(keras_file, layout.keras_model)
    storage.write_text(layout.labels, "".join(name + "\n" for name in class_names))
    log.info("exported SavedModel to %s", layout.saved_model)
    return {"saved_model": layout.saved_model, "keras_model": layout.keras_model, "labels": layout.labels}


def load_serving(path: str):
    """The exported serving function: bytes tensor -> dict of outputs.

    A SavedModel not written by :func:`export_model` (e.g. ``tf.saved_model.save`` of a Keras
    model, whose signature takes pixels) is a DataError saying what the trainer expects,
    instead of a TypeError at the first call.
    """
    from trainer.errors import DataError

    loaded = tf.saved_model.load(path)
    serve = loaded.signatures.get(SIGNATURE)
    if serve is None or not _takes_image_bytes(serve):
        found = ", ".join(f"{name}({', '.join(_input_names(fn))})" for name, fn in loaded.signatures.items())
        raise DataError(
            f"the SavedModel {path} has no {SIGNATURE} signature taking {INPUT_NAME} (encoded JPEG/PNG strings) "
            f"and returning {OUTPUT_NAME} (it has {found or 'no signatures'}); use the export of a run "
            "(<output.dir>/export) or write one with trainer.export.export_model"
        )
    return serve


def _input_names(fn) -> list[str]:
    return sorted(fn.structured_input_signature[1])


def _takes_image_bytes(fn) -> bool:
    inputs = fn.structured_input_signature[1]
    spec = inputs.get(INPUT_NAME)
    return set(inputs) == {INPUT_NAME} and spec.dtype == tf.string and OUTPUT_NAME in (fn.structured_outputs or {})
