"""Feature caches: the frozen part runs once per image, the top of the model trains on its outputs.

train.cache_frozen_features (the whole base frozen):

- the head model is the model's own head: features -> head gives the model's predictions;
- cached training features are the base's outputs for the unaugmented centre squares, even
  with augmentation on (as documented), with the right labels;
- a real `trainer train` run with the cache completes, exports, learns, and its final
  evaluation of the full model on images equals the best cached epoch's validation metrics;
- a cache that does not fit on the scratch disk is a one-line configuration error.

train.cache_frozen_blocks (only top blocks train, block5 by default):
- the cut is below the lowest trained block, and only for a run of top blocks;
- features -> top model (block5 + head) gives the model's predictions;
- train.cache_views=N holds N different augmented views of each image;
- real runs, one process and two workers, cache the fine-tuning phase, export the whole
  network, agree on the weights, and evaluate the full model exactly as the cached epochs did.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from tests.support.training import set_args
from trainer import model as model_lib
from trainer.cli import main
from trainer.config import HeadConfig, ModelConfig, PrepareConfig, config_from_dict
from trainer.contract import Env, ExitCode
from trainer.data import pipeline
from trainer.data.manifest import read_manifest
from trainer.data.prepare import prepare_dataset
from trainer.data.synthetic import make_demo_images
from trainer.errors import ConfigError
from trainer.train import feature_cache

SIZE = 32
SEED = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cache")
    make_demo_images(str(root / "images"), classes=3, per_class=16, size=48, seed=2)
    cfg = PrepareConfig(validation_fraction=0.25, min_shards=2, processes=1)
    prepare_dataset(str(root / "images"), str(root / "dataset"), cfg, progress=lambda _: None)
    return str(root / "dataset")


@pytest.fixture(scope="module")
def model():
    return model_lib.build_model(3, SIZE, ModelConfig(weights="none", head=HeadConfig(dense_units=[8])), seed=SEED)


def test_features_through_the_head_model_are_the_models_predictions(model):
    extractor, head = feature_cache.split_at_head(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)

    through_cache = head(extractor(images, training=False), training=False).numpy()

    np.testing.assert_allclose(through_cache, model(images, training=False).numpy(), rtol=1e-5, atol=1e-6)
    assert model.get_layer("predictions") in head.layers  # shared: training the head trains the model
    assert extractor.output.shape[1:] == (512,)  # cut after the parameter-free average pooling


def test_cached_training_features_are_the_unaugmented_centre_squares_with_their_labels(model, dataset, tmp_path):
    cfg = config_from_dict(
        {"data": {"image_size": SIZE, "augment": {"random_crop": True, "horizontal_flip": True}}}
    )  # augmentation on: the cache must ignore it
    manifest = read_manifest(dataset)
    shard = pipeline.shard_paths(dataset, manifest, "train")[:1]
    extractor, _ = feature_cache.split_at_head(model)

    images = feature_cache.unaugmented_training_images(shard, cfg, manifest.num_classes)
    cache = feature_cache.write_cache(extractor, images, str(tmp_path / "train.bin"))

    features, labels = next(iter(cache.dataset(manifest.num_classes, batch=1000)))
    centre_squares, expected_labels = [], []
    for record in tf.data.TFRecordDataset(shard):
        encoded, label = pipeline._parse(record)
        centre_squares.append(pipeline.decode_for_eval(encoded, SIZE, center_fraction=1.0))
        expected_labels.append(int(label))
    expected_features = extractor(tf.stack(centre_squares), training=False).numpy()
    assert cache.records == len(expected_labels) == manifest.shards["train"][0].records
    np.testing.assert_allclose(features.numpy(), expected_features, rtol=1e-5, atol=1e-5)
    assert labels.numpy().argmax(axis=1).tolist() == expected_labels


def test_a_cache_larger_than_the_free_disk_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        feature_cache.check_disk_space(str(tmp_path), images=10**12, feature_shape=(7, 7, 512))

    message = str(info.value)
    assert "\n" not in message
    assert "train.cache_frozen_features" in message and "TRAINER_SCRATCH_DIR" in message


def _initial_validation_loss(dataset: str) -> float:
    """The validation loss of the model the run starts from (same seed, same head)."""
    manifest = read_manifest(dataset)
    model = model_lib.build_model(
        manifest.num_classes, SIZE, ModelConfig(weights="none", head=HeadConfig(dense_units=[8])), seed=SEED
    )
    model.compile(loss="categorical_crossentropy")
    files = pipeline.shard_paths(dataset, manifest, "validation")
    cfg = config_from_dict({"data": {"image_size": SIZE}})
    images = pipeline.evaluation_images(files, cfg.data, manifest.num_classes).batch(8)
    return float(model.evaluate(images, verbose=0))


def _run_settings(dataset: str, output) -> list[str]:
    """The tests' model (random base, a small head) at 32x32 on ``dataset``, writing to ``output``."""
    return [
        "model.weights=none",
        "model.head.dense_units=[8]",
        f"data.image_size={SIZE}",
        f"data.dataset={dataset}",
        f"output.dir={output}",
        f"runtime.seed={SEED}",
        "runtime.verbose=0",
    ]


def test_a_training_run_with_the_cache_learns_exports_and_cleans_up(dataset, tmp_path, monkeypatch, caplog):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv(Env.SCRATCH_DIR.value, str(scratch))
    output = tmp_path / "run"
    settings = [
        *_run_settings(dataset, output),
        "train.batch_size_per_replica=8",
        "train.steps_per_epoch=8",
        "train.cache_frozen_features=true",
        "data.augment.horizontal_flip=true",  # asked for, and ignored by the cached phase (it warns)
        "phases.feature_extraction.epochs=4",
        "phases.feature_extraction.optimizer.learning_rate=0.01",
        "phases.fine_tuning.epochs=0",
    ]

    with caplog.at_level("INFO"):
        assert main(["train", *set_args(*settings)]) == ExitCode.OK

    assert "feature cache: 36 training records (centre crops) and 12 validation images" in caplog.text
    assert "ignores data.augment" in caplog.text  # the flips asked for are not applied: documented, and said
    summary = json.loads((output / "summary.json").read_text())
    phase = summary["phases"]["feature_extraction"]
    best = phase["history"][phase["best_epoch"] - 1]
    final = summary["evaluation"]["validation"]
    # The full model on images scores exactly what the head scored on the cached validation features.
    assert final["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
    assert final["accuracy"] == pytest.approx(best["val_accuracy"])
    assert final["loss"] < _initial_validation_loss(dataset)  # the head learned
    assert (output / "export" / "saved_model" / "saved_model.pb").exists()
    assert list(scratch.iterdir()) == []  # the cache files are gone with the phase


# --------------------------------------------------------------------------- the fine-tuning cache


@pytest.mark.parametrize(
    ("blocks", "cut"),
    [
        (["block5"], "block4_pool"),
        (["block4", "block5"], "block3_pool"),
        (["block3", "block5"], None),  # block4 trains nothing but sits between: not a fixed function below
        (["block1", "block2", "block3", "block4", "block5"], None),  # everything trains
    ],
)
def test_the_cut_is_below_the_lowest_trained_block_of_a_run_of_top_blocks(model, blocks, cut):
    cfg = config_from_dict({"train": {"cache_frozen_blocks": True}})
    model_lib.set_trainable_blocks(model, blocks)
    try:
        assert feature_cache.cache_cut(model, cfg, blocks) == cut
        assert feature_cache.cache_cut(model, config_from_dict({}), blocks) is None  # off unless asked for
    finally:
        model_lib.set_trainable_blocks(model, [])


def test_block4_features_through_the_top_model_are_the_models_predictions(model):
    extractor, top = feature_cache.split_at(model, "block4_pool")
    images = np.random.default_rng(1).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)

    through_cache = top(extractor(images, training=False), training=False).numpy()

    np.testing.assert_allclose(through_cache, model(images, training=False).numpy(), rtol=1e-5, atol=1e-6)
    base = model_lib.base_of(model)
    assert {base.get_layer(f"block5_conv{i}") for i in (1, 2, 3)} <= set(top.layers)  # shared: block5 trains
    assert extractor.output.shape[1:] == (SIZE // 16, SIZE // 16, 512)  # block4's pooled output


def test_cached_views_are_as_many_different_augmentations_of_each_image(model, dataset, tmp_path):
    cfg = config_from_dict(
        {"data": {"image_size": SIZE, "augment": {"random_crop": True}}, "train": {"cache_views": 3}}
    )
    manifest = read_manifest(dataset)
    shard = pipeline.shard_paths(dataset, manifest, "train")[:1]
    extractor, _ = feature_cache.split_at(model, "block4_pool")

    images = feature_cache.training_images(shard, cfg, manifest.num_classes, seed=0)
    cache = feature_cache.write_cache(extractor, images, str(tmp_path / "train.bin"))

    per_image = manifest.shards["train"][0].records
    assert cache.records == 3 * per_image
    features, labels = next(iter(cache.dataset(manifest.num_classes, batch=cache.records)))
    views = features.numpy().reshape(3, per_image, -1)
    assert not np.allclose(views[0], views[1]) and not np.allclose(views[1], views[2])  # three different crops
    assert (labels.numpy().argmax(axis=1).reshape(3, per_image) == labels.numpy().argmax(axis=1)[:per_image]).all()


def _fine_tuning_cache_settings(dataset: str, output) -> list[str]:
    return [
        *_run_settings(dataset, output),
        "train.batch_size_per_replica=4",
        "train.steps_per_epoch=4",
        "train.cache_frozen_blocks=true",
        "phases.feature_extraction.epochs=1",
        "phases.fine_tuning.epochs=2",
        "phases.fine_tuning.unfreeze_blocks=[block5]",
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cached_fine_tuning_phase_exports_the_whole_network_and_evaluates_as_it_validated(dataset, tmp_path):
    output = tmp_path / "run"

    assert main(["train", *set_args(*_fine_tuning_cache_settings(dataset, output))]) == ExitCode.OK

    summary = json.loads((output / "summary.json").read_text())
    phase = summary["phases"]["fine_tuning"]
    best = phase["history"][(phase["best_epoch"] or phase["epochs_run"]) - 1]
    final = summary["evaluation"]["validation"]
    if phase["best_epoch"] is not None:  # the run ends with the best cached epoch: the full model scores it
        assert final["loss"] == pytest.approx(best["val_loss"], rel=1e-4)
        assert final["accuracy"] == pytest.approx(best["val_accuracy"])
    assert phase["feature_cache"] == "block4_pool"  # block5 and the head trained on block4's features
    assert summary["phases"]["feature_extraction"]["feature_cache"] is None  # not asked for
    exported = tf.keras.models.load_model(output / "export" / "model.keras")
    assert exported.input_shape == (None, SIZE, SIZE, 3)  # the whole network, images in
    assert exported.get_layer(model_lib.BASE_NAME).get_layer("block1_conv1") is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_cache_their_own_shards_and_agree_on_the_weights(dataset, tmp_path):
    import re
    import subprocess

    from trainer.launch import entrypoint_command

    output = tmp_path / "run"
    done = subprocess.run(
        [*entrypoint_command(), "launch", "--workers", "2", *set_args(*_fine_tuning_cache_settings(dataset, output))],
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert done.returncode == ExitCode.OK, (done.stdout + done.stderr)[-3000:]
    logged = dict(
        (worker, fingerprint)
        for fingerprint, worker in re.findall(r"weights fingerprint (\w+) \(worker (\d)\)", done.stdout + done.stderr)
    )
    summary = json.loads((output / "summary.json").read_text())
    assert logged == {"0": summary["weights_fingerprint"], "1": summary["weights_fingerprint"]}
    assert summary["distribution"]["workers"] == 2
