"""The effective training plan: what trains when, at which learning rate, on which augmentation,
and why each automatic choice was made.

Three kinds of choice meet here. The recipe (``recipe``, auto: by the starting weights) lays its
settings under the user's (``trainer.config.RECIPES``); a setting the user gives wins, and the
plan says so. The data decides the augmentation left at auto: a random-area crop only where the
model input is large enough, a left-right flip only where `trainer prepare` found that mirroring
keeps what the images show (``trainer.data.stats``). And the plan warns where a setting the user
gave is likely to hurt (flips on mirror-dependent data, a model input far above the images' size,
a frozen random base).

The same plan is logged at the start of a run, shown by `trainer config`, and stored in
summary.json; the expected epoch time is added once the first steps of a phase are measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainer import config as config_lib
from trainer.config import SMALL_INPUT_SIZE, VGG16_BLOCKS, Config
from trainer.data.stats import (
    UPSAMPLE_WARNING_FACTOR,
    ImageStats,
    default_horizontal_flip,
    default_random_crop,
    suggested_image_size,
)


def scaled_learning_rate(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The documented learning-rate rule: linear scaling (Goyal et al. 2017) by default.

    ``lr = base_lr * (global_batch / reference_batch)`` for ``linear``, the square root of
    that ratio for ``sqrt``, and ``base_lr`` unchanged for ``none``.
    """
    ratio = global_batch / reference_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * ratio**0.5
    return base_lr


@dataclass
class Choice:
    setting: str
    value: Any
    by: str  # "recipe <name>", "data" (an auto setting) or "you"
    reason: str


@dataclass
class Plan:
    recipe: str
    recipe_reason: str
    global_batch: int
    steps_per_epoch: int
    phases: list[dict[str, Any]]
    augmentation: dict[str, Any]
    choices: list[Choice]
    warnings: list[str]
    expected: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> first-steps estimate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        """The plan for people: one line per phase, choice and warning."""
        lines = [f"plan: recipe {self.recipe} ({self.recipe_reason})"]
        for phase in self.phases:
            patience = phase["early_stopping_patience"]
            lines.append(
                f"  phase {phase['name']}: {phase['epochs']} epochs x {self.steps_per_epoch} steps of "
                f"{self.global_batch} images; trains {phase['trains']}; {phase['optimizer']} at learning rate "
                f"{phase['learning_rate']:.3g} ({phase['learning_rate_given']:.3g} per "
                f"{phase['reference_batch']} images, {phase['lr_scaling']} scaling)"
                + (f"; early stopping after {patience} epochs without improvement" if patience else "")
            )
        augmentation = ", ".join(f"{key} {_shown(value)}" for key, value in self.augmentation.items())
        lines.append(f"  augmentation: {augmentation}")
        lines += [f"  {c.setting} = {_shown(c.value)} ({c.by}: {c.reason})" for c in self.choices]
        return lines

    def record_estimate(self, phase: str, seconds_per_step: float, steps: int, epochs: int) -> str:
        """Store the expected epoch and phase time from the first steps; returns the line to log."""
        epoch = seconds_per_step * steps
        self.expected[phase] = {
            "seconds_per_step": round(seconds_per_step, 4),
            "epoch_seconds": round(epoch, 1),
            "phase_seconds": round(epoch * epochs, 1),
        }
        return (
            f"phase {phase}: about {duration(epoch)} per epoch of training ({seconds_per_step:.3f} s per step "
            f"over the first steps), {duration(epoch * epochs)} for its {epochs} epochs, validation not counted"
        )


def recipe_name(cfg: Config) -> str:
    name = config_lib.recipe_of({"recipe": cfg.recipe, "model": {"weights": cfg.model.weights}})
    assert name is not None  # cfg is validated
    return name


def make_plan(cfg: Config, stats: ImageStats | None, global_batch: int, steps_per_epoch: int) -> tuple[Config, Plan]:
    """The config with every auto setting decided, and the plan that explains it."""
    recipe = recipe_name(cfg)
    choices = _recipe_choices(cfg, recipe)
    augment, augment_choices = _decide_augmentation(cfg, stats)
    resolved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": augment})})
    plan = Plan(
        recipe=recipe,
        recipe_reason=config_lib.RECIPES[recipe][0],
        global_batch=global_batch,
        steps_per_epoch=steps_per_epoch,
        phases=_phases(resolved, global_batch),
        augmentation=augment.model_dump(),
        choices=choices + augment_choices,
        warnings=_warnings(cfg, resolved, stats),
    )
    return resolved, plan


def _recipe_choices(cfg: Config, recipe: str) -> list[Choice]:
    choices = []
    for key, (value, reason) in config_lib.RECIPES[recipe][1].items():
        actual = config_lib.lookup(cfg, key)
        if actual == value:
            choices.append(Choice(key, value, f"recipe {recipe}", reason))
        else:
            choices.append(Choice(key, actual, "you", f"your setting wins over recipe {recipe}'s {_shown(value)}"))
    return choices


def _decide_augmentation(cfg: Config, stats: ImageStats | None):
    augment, size = cfg.data.augment, cfg.data.image_size
    choices = []
    random_crop = augment.random_crop
    if random_crop is None:
        random_crop = default_random_crop(size)
        reason = (
            f"model input {size} px > {SMALL_INPUT_SIZE}: random-area crops vary the view"
            if random_crop
            else f"model input {size} px <= {SMALL_INPUT_SIZE}: a random-area crop would cut away most of an image"
        )
        choices.append(Choice("data.augment.random_crop", random_crop, "data", reason))
    flip = augment.horizontal_flip
    if flip is None:
        flip = default_horizontal_flip(stats)
        if stats is None:
            reason = "no image stats (no dataset given, or one prepared by an older trainer: re-run `prepare`)"
        elif stats.mirror_dependent:
            reason = (
                f"`prepare` found the classes mirror-dependent (mirroring costs {stats.mirror_cost:.0%} of a "
                "nearest-mean classifier's accuracy above chance): a flipped image shows no class or another"
            )
        else:
            reason = f"`prepare` found mirroring keeps what the images show (it costs {stats.mirror_cost:.0%})"
        choices.append(Choice("data.augment.horizontal_flip", flip, "data", reason))
    return augment.model_copy(update={"random_crop": random_crop, "horizontal_flip": flip}), choices


def _phases(cfg: Config, global_batch: int) -> list[dict[str, Any]]:
    phases = []
    for name, phase in cfg.phases.items():
        if phase.epochs == 0:
            continue
        blocks = phase.unfreeze_blocks
        trains = (
            "the head only (base frozen)"
            if not blocks
            else "every block and the head"
            if set(blocks) == set(VGG16_BLOCKS)
            else f"{', '.join(blocks)} and the head"
        )
        phases.append(
            {
                "name": name,
                "epochs": phase.epochs,
                "trainable_blocks": list(blocks),
                "trains": trains,
                "optimizer": phase.optimizer.name,
                "learning_rate_given": phase.optimizer.learning_rate,
                "reference_batch": cfg.train.reference_batch_size,
                "lr_scaling": cfg.train.lr_scaling,
                "learning_rate": scaled_learning_rate(
                    phase.optimizer.learning_rate, global_batch, cfg.train.reference_batch_size, cfg.train.lr_scaling
                ),
                "schedule": phase.schedule.name,
                "warmup_epochs": phase.schedule.warmup_epochs,
                "early_stopping_patience": phase.early_stopping_patience,
            }
        )
    return phases


def _warnings(given: Config, resolved: Config, stats: ImageStats | None) -> list[str]:
    warnings = []
    size = resolved.data.image_size
    if given.model.weights == "none" and given.phases["feature_extraction"].epochs > 0:
        warnings.append(
            "phases.feature_extraction trains the head on a frozen base with random weights (model.weights=none): "
            "on real images such features teach it little (0.23 validation accuracy on scanned digits); "
            "set phases.feature_extraction.epochs=0 or recipe=scratch"
        )
    if given.data.augment.random_crop and size <= SMALL_INPUT_SIZE:
        warnings.append(
            f"data.augment.random_crop is on at a {size} px model input: crops keep as little as "
            f"{given.data.augment.crop_area_min:.0%} of a small image; set data.augment.random_crop=auto"
        )
    if stats is not None and given.data.augment.horizontal_flip and stats.mirror_dependent:
        warnings.append(
            f"data.augment.horizontal_flip is on, but `prepare` found the classes mirror-dependent (mirroring "
            f"costs {stats.mirror_cost:.0%}); set data.augment.horizontal_flip=auto"
        )
    if stats is not None and size > UPSAMPLE_WARNING_FACTOR * stats.median_side:
        suggested = suggested_image_size(stats.median_side)
        warnings.append(
            f"data.image_size={size} upsamples the source images (median shorter side {stats.median_side} px) "
            f"{size / max(stats.median_side, 1):.0f}x at {(size / suggested) ** 2:.0f}x the compute of "
            f"data.image_size={suggested}; set --set data.image_size={suggested} unless the detail is needed"
        )
    return warnings


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def duration(seconds: float) -> str:
    """Seconds for people: tenths below 10 s, then seconds, minutes, hours."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
