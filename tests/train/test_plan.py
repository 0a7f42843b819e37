"""The effective plan: recipes under the user's settings, auto augmentation from the data, and the
reasons and warnings a user reads at start, in `trainer config` and in summary.json."""

from __future__ import annotations

import math

import pytest

from trainer.config import VGG16_BLOCKS, load_config
from trainer.data.stats import ImageStats
from trainer.train.plan import make_plan, scaled_learning_rate

#: What `prepare` measures on 32 px digits: mirroring costs most of the above-chance accuracy.
DIGITS = ImageStats(
    images=1257, median_width=32, median_height=32, nearest_mean_accuracy=0.9, mirrored_accuracy=0.35, chance=0.1
)
PHOTOS = ImageStats(
    images=5000, median_width=500, median_height=375, nearest_mean_accuracy=0.3, mirrored_accuracy=0.29, chance=0.2
)


def _plan(*settings: str, stats: ImageStats | None = DIGITS, global_batch: int = 64):
    return make_plan(load_config(overrides=list(settings)), stats, global_batch, steps_per_epoch=10)


def test_random_weights_train_every_block_from_the_start_with_adam():
    _, plan = _plan("model.weights=none", "data.image_size=32")

    assert plan.recipe == "scratch"
    assert [p["name"] for p in plan.phases] == ["fine_tuning"]
    (phase,) = plan.phases
    assert phase["trainable_blocks"] == list(VGG16_BLOCKS)
    assert phase["optimizer"] == "adam"
    assert phase["learning_rate"] == pytest.approx(1e-4 * 64 / 32)  # linear scaling to the global batch
    assert {c.setting: c.by for c in plan.choices}["phases.feature_extraction.epochs"] == "recipe scratch"


def test_pretrained_weights_keep_the_transfer_recipe():
    cfg, plan = _plan("data.image_size=224", stats=PHOTOS)

    assert plan.recipe == "transfer"
    assert [p["trainable_blocks"] for p in plan.phases] == [[], ["block5"]]
    assert cfg.data.augment.random_crop is True and cfg.data.augment.horizontal_flip is True
    assert plan.warnings == []


def test_a_setting_the_user_gives_wins_over_the_recipe_and_the_plan_says_so():
    cfg, plan = _plan("model.weights=none", "phases.fine_tuning.optimizer.learning_rate=3e-4")

    assert cfg.phases["fine_tuning"].optimizer.learning_rate == 3e-4
    (choice,) = [c for c in plan.choices if c.setting == "phases.fine_tuning.optimizer.learning_rate"]
    assert (choice.by, choice.value) == ("you", 3e-4)


def test_mirror_dependent_small_images_get_no_flips_and_no_random_crops():
    cfg, plan = _plan("model.weights=none", "data.image_size=32")

    assert cfg.data.augment.horizontal_flip is False
    assert cfg.data.augment.random_crop is False
    assert {c.setting: c.by for c in plan.choices}["data.augment.horizontal_flip"] == "data"


def test_settings_that_hurt_the_data_are_warned_about_with_the_fix():
    _, plan = _plan(
        "model.weights=none",
        "recipe=transfer",
        "data.image_size=224",
        "data.augment.horizontal_flip=true",
    )

    text = " | ".join(plan.warnings)
    assert "phases.feature_extraction.epochs=0" in text  # a frozen random base
    assert "data.augment.horizontal_flip=auto" in text  # flips on mirror-dependent data
    assert "--set data.image_size=32" in text  # 224 px on 32 px images
    assert len(plan.warnings) == 3


def test_a_dataset_without_stats_keeps_flips_and_says_why():
    cfg, plan = _plan("data.image_size=96", stats=None)

    assert cfg.data.augment.horizontal_flip is True and cfg.data.augment.random_crop is True
    (flip,) = [c for c in plan.choices if c.setting == "data.augment.horizontal_flip"]
    assert "re-run `prepare`" in flip.reason


def test_the_notebook_recipe_is_the_notebooks_model_and_schedule():
    cfg, plan = _plan("recipe=notebook", "model.weights=none")

    assert cfg.model.head.pooling == "flatten" and cfg.model.head.dense_units == [256]
    assert cfg.model.head.dropout == 0.5
    assert [p["name"] for p in plan.phases] == ["fine_tuning"]
    (phase,) = plan.phases
    assert phase["trainable_blocks"] == ["block5"]
    assert (phase["optimizer"], phase["learning_rate"]) == ("adam", 1e-4)  # no scaling: the notebook has none
    assert (phase["epochs"], phase["early_stopping_patience"], cfg.train.monitor) == (20, 3, "val_loss")


def test_the_estimate_from_the_first_steps_goes_into_the_plan():
    _, plan = _plan("model.weights=none")

    line = plan.record_estimate("fine_tuning", seconds_per_step=0.5, steps=120, epochs=8)

    assert plan.to_dict()["expected"]["fine_tuning"] == {
        "seconds_per_step": 0.5,
        "epoch_seconds": 60.0,
        "phase_seconds": 480.0,
    }
    assert "8 min" in line


def test_trainer_config_prints_the_plan_as_comments_after_valid_yaml(capsys):
    import yaml

    from trainer.cli import main

    code = main(["config", "--set", "model.weights=none", "--set", "data.image_size=32"])

    printed = capsys.readouterr().out
    assert code == 0
    assert yaml.safe_load(printed)["phases"]["feature_extraction"]["epochs"] == 0
    comments = [line for line in printed.splitlines() if line.startswith("# ")]
    assert any("recipe scratch" in line for line in comments)
    assert any("data.augment.random_crop = off" in line for line in comments)


@pytest.mark.parametrize(
    ("rule", "global_batch", "expected"),
    [
        ("linear", 128, 0.004),  # 4x the reference batch -> 4x the rate
        ("linear", 32, 0.001),
        ("linear", 16, 0.0005),
        ("sqrt", 128, 0.002),  # sqrt(4) = 2
        ("sqrt", 64, 0.001 * math.sqrt(2)),
        ("none", 128, 0.001),
    ],
)
def test_scaled_learning_rate(rule, global_batch, expected):
    assert scaled_learning_rate(0.001, global_batch, 32, rule) == pytest.approx(expected)
