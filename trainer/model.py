"""VGG16 without its top, plus a configurable classification head.

The model takes RGB pixels in [0, 255]; its first layer (``preprocess``) applies VGG16's
own preprocessing, so that per-pixel work runs on the accelerator rather than in the
host's input pipeline. The base is a nested model named ``vgg16`` whose layers keep
Keras' names (``block5_conv3`` ...), so ImageNet weights and Keras "notop" weight files
load by name. The softmax output stays float32 under mixed precision for a numerically
stable loss.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer.config import HeadConfig, ModelConfig
from trainer.errors import DataError, TransientError

log = logging.getLogger(__name__)

BASE_NAME = "vgg16"
PREPROCESS_NAME = "preprocess"
# VGG16's "caffe" preprocessing: RGB -> BGR, minus the ImageNet channel means (BGR order).
VGG_MEAN_BGR = (103.939, 116.779, 123.68)
OUTPUT_LAYER = "predictions"
CLASS_NAMES_ATTR = "class_names"  # HDF5 attribute of the weights files this trainer writes
# The layers (and kernel shapes' channel counts) a VGG16 weights file must contain.
VGG16_CONV_LAYERS = {
    "block1_conv1": 64, "block1_conv2": 64,
    "block2_conv1": 128, "block2_conv2": 128,
    "block3_conv1": 256, "block3_conv2": 256, "block3_conv3": 256,
    "block4_conv1": 512, "block4_conv2": 512, "block4_conv3": 512,
    "block5_conv1": 512, "block5_conv2": 512, "block5_conv3": 512,
}  # fmt: skip


def build_model(
    num_classes: int,
    image_size: int,
    cfg: ModelConfig,
    weights_file: WeightsFile | None = None,
    seed: int | None = None,
) -> keras.Model:
    """The classifier with its base frozen. Base weights: ImageNet, random, or ``weights_file``

    (read and checked by the caller with :func:`read_weights_file`/:func:`check_weights_file`).
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    base = _build_base(image_size, cfg.weights, weights_file)
    base.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = base(VGG16Preprocess(name=PREPROCESS_NAME)(inputs), training=False)
    outputs = _head(features, num_classes, cfg.head)
    return Classifier(inputs, outputs, name="vgg16_classifier")


@keras.saving.register_keras_serializable(package="vgg_trainer")
class Classifier(keras.Model):
    """A functional Keras model whose training step stamps when its gradients are ready, and can
    compile its compute with XLA while the all-reduce stays outside.

    The step is Keras' own (forward, loss, gradients, update, metrics), split in two: the
    compute (forward, loss, backward; the loss scaled and the gradients unscaled under
    mixed_float16, as the LossScaleOptimizer's custom-loop API does) and the update
    (``apply_gradients``: the all-reduce across replicas, then the optimizer). Between them,
    ``gradients_ready`` runs when set: a Python callable (telemetry's probe), set before the
    first ``fit`` after ``compile``. With ``compile_compute`` (``runtime.jit_compile``) the
    compute alone is compiled with XLA: XLA has no collectives on CPU devices (TensorFlow
    b/194942685), so compiling the whole step fails under MultiWorkerMirroredStrategy on CPU, and
    the stamp, being Python, could not run inside it.

    The training images' random flips (``data.augment``) happen here, on the device, not in the
    host's input pipeline: ``flips`` = (left-right, up-down), set with ``compile`` like
    ``compile_compute``. Each image of a batch is flipped with probability 1/2, drawn from a
    stateless generator keyed by ``flip_seed``, the replica and the optimizer's step counter, so
    a run resumed from a backup flips exactly as the uninterrupted one would.
    """

    gradients_ready = None
    compile_compute = False
    flips = (False, False)
    flip_seed = 0

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if any(self.flips):
            x = random_flips(x, self.flips, self._flip_key())
        compute = tf.function(self._compute, jit_compile=True) if self.compile_compute else self._compute
        y_pred, grads = compute(x, y, sample_weight)
        if self.gradients_ready is not None:
            with tf.control_dependencies([g for g in grads if g is not None]):
                tf.py_function(self.gradients_ready, [], Tout=tf.int64)  # stateful: always runs
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def _flip_key(self) -> tf.Tensor:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        iterations = tf.cast(self.optimizer.iterations, tf.int64)
        return tf.stack([tf.cast(self.flip_seed, tf.int64) * 65536 + tf.cast(replica, tf.int64), iterations])

    def _compute(self, x, y, sample_weight):
        scaling = isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            if scaling:
                loss = self.optimizer.get_scaled_loss(loss)
        grads = tape.gradient(loss, self.trainable_variables)
        return y_pred, self.optimizer.get_unscaled_gradients(grads) if scaling else grads


def random_flips(images: tf.Tensor, flips: tuple[bool, bool], key: tf.Tensor) -> tf.Tensor:
    """Flip each image of a [batch, height, width, channels] batch left-right and/or upside down with
    probability 1/2, from the stateless seed ``key`` (two int64)."""
    for axis, wanted in ((2, flips[0]), (1, flips[1])):
        if wanted:
            key = key + tf.constant([0, 1 << 40], tf.int64)  # each axis draws its own coins
            coins = tf.random.stateless_uniform(tf.shape(images)[:1], key) < 0.5
            images = tf.where(coins[:, None, None, None], tf.reverse(images, [axis]), images)
    return images


@keras.saving.register_keras_serializable(package="vgg_trainer")
class VGG16Preprocess(keras.layers.Layer):
    """RGB in [0, 255] -> BGR minus the ImageNet means: exactly keras' vgg16.preprocess_input.

    Computes in float32 even under mixed precision (the base casts its input to float16).
    ``tf.reverse``, not ``x[..., ::-1]``: the negative-stride slice takes TensorFlow's slow
    generic strided-slice path (3-4x slower, measured).
    """

    def __init__(self, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)

    def call(self, inputs):
        return tf.reverse(inputs, axis=[-1]) - tf.constant(VGG_MEAN_BGR, dtype=inputs.dtype)


def uses_weights_file(cfg: ModelConfig) -> bool:
    return cfg.weights.lower() not in ("imagenet", "none", "null", "random")


def _build_base(image_size: int, weights: str, weights_file: WeightsFile | None) -> keras.Model:
    if weights.lower() == "imagenet":
        try:
            return keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=(image_size,) * 2 + (3,))
        except Exception as err:  # the download raises a plain Exception wrapping the URL error
            raise TransientError(
                f"could not load ImageNet weights for VGG16 ({type(err).__name__}); check network access, "
                "or pre-stage the notop .h5 file and set model.weights=PATH"
            ) from None
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size,) * 2 + (3,))
    if weights_file is not None:
        load_base_weights(base, weights_file)
    return base


def _head(features, num_classes: int, head: HeadConfig):
    x = (
        keras.layers.GlobalAveragePooling2D(name="pool")(features)
        if head.pooling == "avg"
        else (keras.layers.Flatten(name="flatten")(features))
    )
    for i, units in enumerate(head.dense_units, start=1):
        x = keras.layers.Dense(units, activation=head.activation, name=f"head_dense_{i}")(x)
        if head.dropout > 0:
            x = keras.layers.Dropout(head.dropout, name=f"head_dropout_{i}")(x)
    logits = keras.layers.Dense(num_classes, name=OUTPUT_LAYER)(x)
    # float32 softmax: under mixed_float16 the rest of the model computes in half precision.
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


# --------------------------------------------------------------------------- weights files


@dataclass
class WeightsFile:
    path: str
    layers: dict[str, list[np.ndarray]]  # layer name -> arrays, nested models flattened
    class_names: list[str] | None  # written by this trainer; None for Keras/ImageNet files


def read_weights_file(path: str) -> WeightsFile:
    """Read a Keras HDF5 weights file (flat Keras layout, or ours with a nested ``vgg16``)."""
    import h5py

    from trainer import storage

    try:
        with h5py.File(io.BytesIO(storage.read_bytes(path)), "r") as h5:
            root = h5.get("model_weights", h5)
            names = root.attrs.get(CLASS_NAMES_ATTR)
            class_names = [_text(n) for n in names] if names is not None else None
            return WeightsFile(path, _layers_of(root), class_names)
    except FileNotFoundError:
        raise DataError(f"model.weights {path} does not exist; fix the path or use 'imagenet' or 'none'") from None
    except (OSError, KeyError) as err:
        raise DataError(
            f"model.weights {path} is not a readable Keras .h5 weights file ({err}); point it at a VGG16 .h5 file"
        ) from None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _layers_of(group) -> dict[str, list[np.ndarray]]:
    layers: dict[str, list[np.ndarray]] = {}
    for name in map(_text, group.attrs.get("layer_names", [])):
        layer = group[name]
        weight_names = [_text(n) for n in layer.attrs.get("weight_names", [])]
        owners = {w.split("/")[0] for w in weight_names if "/" in w}
        if owners - {name}:  # a nested model (our vgg16 base): weights belong to its inner layers
            for weight_name in weight_names:
                layers.setdefault(weight_name.split("/")[0], []).append(np.asarray(layer[weight_name]))
        else:
            layers[name] = [np.asarray(layer[w]) for w in weight_names]
    return layers


def check_weights_file(weights: WeightsFile, class_names: list[str] | None = None) -> None:
    """Refuse files of another architecture, or a classifier trained for other classes."""
    path = weights.path
    for name, channels in VGG16_CONV_LAYERS.items():
        arrays = weights.layers.get(name)
        if not arrays:
            raise DataError(
                f"model.weights {path} is not a VGG16 weights file (no layer {name}); "
                "use VGG16 notop weights or a weights file written by this trainer"
            )
        if arrays[0].ndim != 4 or arrays[0].shape[-1] != channels:
            raise DataError(
                f"model.weights {path}: layer {name} has shape {arrays[0].shape}, not VGG16's; use VGG16 weights"
            )
    if class_names is not None and weights.class_names is not None and weights.class_names != class_names:
        raise DataError(
            f"model.weights {path} was trained for classes {weights.class_names} but the dataset has {class_names}; "
            "use VGG16 notop weights, or weights trained on this dataset's classes"
        )


def load_base_weights(base: keras.Model, weights: WeightsFile) -> None:
    """Copy the file's VGG16 conv weights into ``base``; any head in the file is ignored."""
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(weights.layers[layer.name])
    log.info("loaded VGG16 base weights from %s", weights.path)


def save_weights(model: keras.Model, path: str, class_names: list[str]) -> None:
    """Save all weights as .h5 with the class names inside, so a later load can check them."""
    import h5py

    from trainer import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "weights.h5")
        model.save_weights(local, save_format="h5")
        with h5py.File(local, "a") as h5:
            h5.attrs[CLASS_NAMES_ATTR] = [n.encode() for n in class_names]
        with open(local, "rb") as fh:
            storage.write_bytes(path, fh.read())


def load_weights(model: keras.Model, path: str) -> None:
    """Load weights written by :func:`save_weights` (same architecture)."""
    from trainer import storage

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "weights.h5")
        with open(local, "wb") as fh:
            fh.write(storage.read_bytes(path))
        model.load_weights(local)


# --------------------------------------------------------------------------- phases


def base_of(model: keras.Model) -> keras.Model:
    return model.get_layer(BASE_NAME)


def set_trainable_blocks(model: keras.Model, blocks: list[str]) -> None:
    """Freeze the base except the named blocks; the head always trains."""
    base = base_of(model)
    base.trainable = bool(blocks)
    for layer in base.layers:
        layer.trainable = layer.name.split("_")[0] in blocks


def trainable_parameter_count(model: keras.Model) -> int:
    return int(sum(keras.backend.count_params(w) for w in model.trainable_weights))
