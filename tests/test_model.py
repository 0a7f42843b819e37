"""trainer.model: the VGG16 classifier, its head, trainable blocks and weights files."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from trainer import model as model_lib
from trainer.config import HeadConfig, ModelConfig
from trainer.errors import DataError

SIZE = 32  # the smallest input VGG16 accepts: fast to build and run
CLASSES = ["cat", "dog", "fox"]
CONV_LAYERS = list(model_lib.VGG16_CONV_LAYERS)


@pytest.fixture(scope="module")
def model():
    """A 3-class classifier with random base weights and the default head (avg, [256], relu, dropout 0.5)."""
    return model_lib.build_model(len(CLASSES), SIZE, ModelConfig(weights="none"), seed=1)


@pytest.fixture(scope="module")
def weights_path(model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("weights") / "classifier.weights.h5")
    model_lib.save_weights(model, path, CLASSES)
    return path


def data_error(call, *args) -> str:
    with pytest.raises(DataError) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- building


def test_default_head_layers(model):
    names = [layer.name for layer in model.layers]

    assert names == [
        "image", "preprocess", "vgg16", "pool", "head_dense_1", "head_dropout_1", "predictions", "probabilities"
    ]  # fmt: skip
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalAveragePooling2D)
    dense = model.get_layer("head_dense_1")
    assert (dense.units, dense.activation.__name__) == (256, "relu")
    assert model.get_layer("head_dropout_1").rate == 0.5
    assert model.get_layer("predictions").units == len(CLASSES)
    assert model.input_shape == (None, SIZE, SIZE, 3)
    assert model.output_shape == (None, len(CLASSES))


def test_predictions_are_probabilities(model):
    images = np.random.default_rng(0).uniform(0, 255, size=(2, SIZE, SIZE, 3)).astype(np.float32)

    probabilities = model(images, training=False).numpy()

    assert probabilities.shape == (2, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), [1.0, 1.0], rtol=1e-5)


def test_preprocess_layer_equals_keras_vgg16_preprocess_input():
    rgb = np.random.default_rng(1).uniform(0, 255, size=(2, 5, 5, 3)).astype(np.float32)

    ours = model_lib.VGG16Preprocess()(tf.constant(rgb)).numpy()

    np.testing.assert_array_equal(ours, keras.applications.vgg16.preprocess_input(rgb.copy()))


def test_model_on_rgb_pixels_equals_its_base_on_keras_preprocessed_pixels(model):
    rgb = np.random.default_rng(2).uniform(0, 255, size=(2, SIZE, SIZE, 3)).astype(np.float32)
    features = keras.Model(model.input, model.get_layer("pool").input)

    expected = model_lib.base_of(model)(keras.applications.vgg16.preprocess_input(rgb.copy()), training=False)

    np.testing.assert_allclose(features(rgb, training=False).numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_base_starts_frozen_only_the_head_trains(model):
    base = model_lib.base_of(model)

    assert not base.trainable
    assert {w.name.split("/")[0] for w in model.trainable_weights} == {"head_dense_1", "predictions"}
    assert model_lib.trainable_parameter_count(model) == (512 * 256 + 256) + (256 * 3 + 3)


def test_flatten_head_without_dropout_and_float32_output_under_mixed_precision():
    head = HeadConfig(pooling="flatten", dense_units=[64, 32], activation="tanh", dropout=0.0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = model_lib.build_model(2, SIZE, ModelConfig(weights="none", head=head))
    finally:
        keras.mixed_precision.set_global_policy("float32")

    names = [layer.name for layer in mixed.layers]
    assert names == [
        "image", "preprocess", "vgg16", "flatten", "head_dense_1", "head_dense_2", "predictions", "probabilities"
    ]  # fmt: skip
    assert [mixed.get_layer(f"head_dense_{i}").units for i in (1, 2)] == [64, 32]
    assert mixed.get_layer("head_dense_1").activation.__name__ == "tanh"
    assert mixed.get_layer("predictions").compute_dtype == "float16"
    assert mixed.output.dtype == tf.float32
    assert mixed(np.zeros((1, SIZE, SIZE, 3), np.float32)).dtype == tf.float32


def test_head_without_hidden_layers():
    # No VGG16 needed to check this part: the head is built on any feature map.
    features = keras.Input((1, 1, 512))
    outputs = model_lib._head(features, 4, HeadConfig(dense_units=[]))
    head = keras.Model(features, outputs)

    assert [layer.name for layer in head.layers[1:]] == ["pool", "predictions", "probabilities"]


def test_set_trainable_blocks_unfreezes_exactly_the_named_blocks_and_the_head(model):
    try:
        model_lib.set_trainable_blocks(model, ["block5"])

        trainable = {w.name.split("/")[0] for w in model.trainable_weights}
        assert trainable == {"block5_conv1", "block5_conv2", "block5_conv3", "head_dense_1", "predictions"}
        assert model_lib.base_of(model).get_layer("block4_conv3").trainable is False

        model_lib.set_trainable_blocks(model, ["block4", "block5"])
        assert len({w.name.split("/")[0] for w in model.trainable_weights}) == 8
    finally:
        model_lib.set_trainable_blocks(model, [])

    assert {w.name.split("/")[0] for w in model.trainable_weights} == {"head_dense_1", "predictions"}


@pytest.mark.parametrize(
    ("weights", "is_file"),
    [
        ("imagenet", False),
        ("none", False),
        ("random", False),
        ("/models/vgg16_notop.h5", True),
        ("gs://bucket/w.h5", True),
    ],
)
def test_uses_weights_file(weights, is_file):
    assert model_lib.uses_weights_file(ModelConfig(weights=weights)) is is_file


# --------------------------------------------------------------------------- weights files


def test_save_then_read_weights_file_carries_class_names_and_conv_weights(model, weights_path):
    weights = model_lib.read_weights_file(weights_path)

    assert weights.path == weights_path
    assert weights.class_names == CLASSES
    base = model_lib.base_of(model)
    for name in CONV_LAYERS:
        kernel, bias = weights.layers[name]
        np.testing.assert_array_equal(kernel, base.get_layer(name).get_weights()[0])
        np.testing.assert_array_equal(bias, base.get_layer(name).get_weights()[1])
    np.testing.assert_array_equal(weights.layers["predictions"][0], model.get_layer("predictions").get_weights()[0])
    model_lib.check_weights_file(weights, CLASSES)  # same classes: accepted
    model_lib.check_weights_file(weights)  # no dataset classes to compare: accepted


def test_keras_style_base_weights_file_is_accepted_without_class_names(model, tmp_path):
    path = str(tmp_path / "vgg16_notop.h5")
    model_lib.base_of(model).save_weights(path, save_format="h5")  # flat layout, like Keras' notop file

    weights = model_lib.read_weights_file(path)

    assert weights.class_names is None
    model_lib.check_weights_file(weights, ["any", "classes"])
    np.testing.assert_array_equal(
        weights.layers["block3_conv2"][0], model_lib.base_of(model).get_layer("block3_conv2").get_weights()[0]
    )


def test_weights_file_of_another_architecture_is_a_data_error(tmp_path):
    path = str(tmp_path / "dense.h5")
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save_weights(path, save_format="h5")

    message = data_error(model_lib.check_weights_file, model_lib.read_weights_file(path))

    assert message.startswith(f"model.weights {path} is not a VGG16 weights file (no layer block1_conv1)")


def test_weights_file_with_wrong_conv_shapes_is_a_data_error(tmp_path):
    path = str(tmp_path / "narrow.h5")
    narrow = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, name="block1_conv1")])
    narrow.save_weights(path, save_format="h5")

    message = data_error(model_lib.check_weights_file, model_lib.read_weights_file(path))

    assert "layer block1_conv1 has shape (3, 3, 3, 8), not VGG16's" in message


def test_weights_file_for_other_classes_is_a_data_error(weights_path):
    weights = model_lib.read_weights_file(weights_path)

    message = data_error(model_lib.check_weights_file, weights, ["cat", "dog", "wolf"])

    assert "was trained for classes ['cat', 'dog', 'fox'] but the dataset has ['cat', 'dog', 'wolf']" in message


def test_missing_weights_file_is_a_data_error(tmp_path):
    path = str(tmp_path / "missing.h5")

    message = data_error(model_lib.read_weights_file, path)

    assert message == f"model.weights {path} does not exist; fix the path or use 'imagenet' or 'none'"


def test_weights_file_that_is_not_hdf5_is_a_data_error(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("this is not HDF5\n")

    message = data_error(model_lib.read_weights_file, str(path))

    assert message.startswith(f"model.weights {path} is not a readable Keras .h5 weights file (")


def test_build_model_with_a_weights_file_loads_its_conv_weights(model, weights_path):
    weights = model_lib.read_weights_file(weights_path)

    loaded = model_lib.build_model(len(CLASSES), SIZE, ModelConfig(weights=weights_path), weights, seed=2)

    source, target = model_lib.base_of(model), model_lib.base_of(loaded)
    for name in CONV_LAYERS:
        for expected, actual in zip(
            source.get_layer(name).get_weights(), target.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(actual, expected)
    # Only the base comes from the file: the head is freshly initialised (seed 2, not seed 1).
    assert not np.array_equal(
        loaded.get_layer("head_dense_1").get_weights()[0], model.get_layer("head_dense_1").get_weights()[0]
    )
    assert not model_lib.base_of(loaded).trainable


# --------------------------------------------------------------------------- random flips in the step


def _asymmetric_batch(count: int = 64) -> tf.Tensor:
    """Image i holds i in its top-left pixel and nothing else: where that pixel went shows each flip."""
    images = np.zeros((count, 4, 4, 3), np.float32)
    images[:, 0, 0, :] = np.arange(1, count + 1)[:, None]
    return tf.constant(images)


def _corner(flipped: np.ndarray) -> list[str]:
    names = {(0, 0): "none", (0, 3): "left-right", (3, 0): "up-down", (3, 3): "both"}
    return [names[tuple(int(v) for v in np.argwhere(image[..., 0] > 0)[0])] for image in flipped]


def test_random_flips_flip_about_half_of_the_images_per_axis_and_repeat_for_the_same_key():
    images = _asymmetric_batch()
    key = tf.constant([7, 0], tf.int64)

    left_right = _corner(model_lib.random_flips(images, (True, False), key).numpy())
    both = _corner(model_lib.random_flips(images, (True, True), key).numpy())

    assert set(left_right) == {"none", "left-right"} and 16 < left_right.count("left-right") < 48
    assert set(both) == {"none", "left-right", "up-down", "both"}
    assert _corner(model_lib.random_flips(images, (True, True), key).numpy()) == both
    assert _corner(model_lib.random_flips(images, (True, True), tf.constant([7, 1], tf.int64)).numpy()) != both
    np.testing.assert_array_equal(model_lib.random_flips(images, (False, False), key), images)


def test_the_training_step_flips_its_images_keyed_by_the_optimizer_step(model):
    """The step flips what it trains on (the loss differs from an unflipped step on asymmetric images),
    and the same step counter gives the same flips: a resumed run flips as the uninterrupted one."""
    rng = np.random.default_rng(0)
    x = np.tile(np.linspace(0, 255, SIZE, dtype=np.float32)[None, None, :, None], (8, SIZE, 1, 3))
    x = x + rng.uniform(0, 1, x.shape).astype(np.float32)
    y = np.eye(len(CLASSES), dtype=np.float32)[np.arange(8) % len(CLASSES)]

    def first_step_loss(flips) -> float:
        clone = model_lib.build_model(len(CLASSES), SIZE, ModelConfig(weights="none"), seed=1)
        clone.compile(keras.optimizers.SGD(0.0), "categorical_crossentropy")
        clone.flips, clone.flip_seed = flips, 3
        return float(clone.train_on_batch(x, y))

    plain = first_step_loss((False, False))
    flipped = first_step_loss((True, False))
    assert flipped != pytest.approx(plain, abs=1e-6)
    assert first_step_loss((True, False)) == pytest.approx(flipped, abs=1e-6)
