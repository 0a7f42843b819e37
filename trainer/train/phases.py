"""One training phase: set what trains, compile (inside the strategy scope), fit.

Phase 1 (feature extraction) trains the head on a frozen base. Phase 2 (fine tuning)
unfreezes the named top blocks and continues at a lower learning rate. Each phase gets
a fresh optimizer and schedule, and its own resumable backup directory.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras

from trainer import model as model_lib
from trainer import storage
from trainer.config import Config, PhaseConfig
from trainer.data import pipeline
from trainer.layout import RunLayout
from trainer.train.backup import PhaseBackup, Position, segments
from trainer.train.callbacks import (
    Backups,
    EarlyStopping,
    EpochTimer,
    FirstStepsEstimate,
    KeepBest,
    MetricsLog,
    StopRequest,
)
from trainer.train.evaluation import EvaluationData, Validation
from trainer.train.plan import scaled_learning_rate
from trainer.train.state import PhaseResult

log = logging.getLogger(__name__)


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over ``warmup_steps``, then constant or cosine decay to 0.

    Not Keras' ``CosineDecay(warmup_target=..., alpha=1.0 for constant)``: its warm-up starts at 0, so
    the first step learns nothing, and shifting its ramp by one step shifts the cosine too.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0, decay: str = "constant"):
        self.peak, self.total_steps, self.warmup_steps, self.decay = peak, total_steps, warmup_steps, decay

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = float(max(self.warmup_steps, 1))
        warmup = self.peak * tf.minimum((step + 1.0) / warm, 1.0) if self.warmup_steps else self.peak
        if self.decay != "cosine":
            return tf.convert_to_tensor(warmup, tf.float32)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = 0.5 * self.peak * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "peak": self.peak,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
        }


def make_optimizer(phase: PhaseConfig, learning_rate: float, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    opt = phase.optimizer
    schedule = WarmupSchedule(
        peak=learning_rate,
        total_steps=phase.epochs * steps_per_epoch,
        warmup_steps=round(phase.schedule.warmup_epochs * steps_per_epoch),
        decay=phase.schedule.name,
    )
    common = {"learning_rate": schedule, "weight_decay": opt.weight_decay or None, "clipnorm": opt.clipnorm or None}
    if opt.name == "sgd":
        return keras.optimizers.SGD(momentum=opt.momentum, **common)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=opt.momentum, **common)
    return keras.optimizers.Adam(**common)


@dataclass
class PhasePlan:
    """Everything fixed about a phase before it runs (derived from config + cluster)."""

    name: str
    config: PhaseConfig
    steps_per_epoch: int
    validation_steps: int | None
    global_batch: int
    learning_rate: float  # after scaling to the global batch
    first_global_step: int  # steps of earlier phases, for a run-wide step count


def plan_phase(name: str, cfg: Config, steps_per_epoch: int, global_batch: int, first_step: int) -> PhasePlan:
    phase = cfg.phases[name]
    lr = scaled_learning_rate(
        phase.optimizer.learning_rate, global_batch, cfg.train.reference_batch_size, cfg.train.lr_scaling
    )
    return PhasePlan(name, phase, steps_per_epoch, cfg.train.validation_steps or None, global_batch, lr, first_step)


def compile_for_phase(model: keras.Model, plan: PhasePlan, cfg: Config, strategy) -> None:
    """Freeze/unfreeze, then compile with a fresh optimizer, inside the strategy scope."""
    with strategy.scope():
        model_lib.set_trainable_blocks(model, plan.config.unfreeze_blocks)
        model.compile(
            optimizer=make_optimizer(plan.config, plan.learning_rate, plan.steps_per_epoch),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
        # XLA compiles the step's compute only (trainer.model.Classifier): not its all-reduce.
        model.compile_compute = cfg.runtime.jit_compile
        # The training pipeline leaves random flips to the model's step, on the device (trainer.data.pipeline).
        model.flips = pipeline.flips(cfg.data.augment)
        model.flip_seed = cfg.runtime.seed
    log.info(
        "phase %s: %d epochs x %d steps, global batch %d, learning rate %.3g, trainable blocks %s, "
        "%d trainable parameters",
        plan.name,
        plan.config.epochs,
        plan.steps_per_epoch,
        plan.global_batch,
        plan.learning_rate,
        plan.config.unfreeze_blocks or "none (base frozen)",
        model_lib.trainable_parameter_count(model),
    )


def run_phase(
    model: keras.Model,
    plan: PhasePlan,
    cfg: Config,
    layout: RunLayout,
    train_data,
    validation: EvaluationData | None,
    is_chief: bool,
    class_names: list[str],
    baseline: tuple[float, float] | None = None,
    telemetry=None,
    run_plan=None,
) -> PhaseResult:
    """Fit one phase with exact validation, backups, best-weights tracking, early stopping and logs."""
    monitor = cfg.train.monitor if validation is not None else cfg.train.monitor.removeprefix("val_")

    def save(m, path):
        model_lib.save_weights(m, path, class_names)

    timer = EpochTimer(plan.global_batch)
    metrics_log = MetricsLog(
        layout.metrics_log, plan.name, timer, plan.steps_per_epoch, is_chief, plan.first_global_step
    )
    keep_best = KeepBest(
        monitor, layout.best_weights(plan.name), layout.best_record(plan.name), is_chief, save, baseline
    )
    keep_best.start(model, model_lib.load_weights)
    callbacks = [
        timer,
        keep_best,
        metrics_log,
        keras.callbacks.TensorBoard(storage.join(layout.tensorboard, plan.name), profile_batch=0),
    ]
    if run_plan is not None and is_chief:  # trainer.train.plan.Plan: the expected epoch time, from the first steps

        def report(seconds_per_step: float) -> None:
            estimate = run_plan.record_estimate(plan.name, seconds_per_step, plan.steps_per_epoch, plan.config.epochs)
            log.info("%s", estimate)

        callbacks.append(FirstStepsEstimate(report))
    early = (
        EarlyStopping(keep_best, plan.config.early_stopping_patience) if plan.config.early_stopping_patience else None
    )
    if early is not None:
        callbacks.append(early)
    strategy = model.distribute_strategy
    backup = PhaseBackup(layout.backup(plan.name), model, cfg.train.backups_to_keep, is_chief)
    with strategy.scope():
        position = backup.restore()
    _log_resumed(position, plan)
    resumed_steps = position.phase_steps if position is not None else 0
    if telemetry is not None:  # trainer.train.telemetry.RunTelemetry: metrics of steps, epochs and backups
        telemetry.instrument(callbacks, model, plan, resumed_steps)
    if validation is not None:  # first: the callbacks after it read val_loss and val_accuracy
        callbacks.insert(0, Validation(validation, cfg.train.label_smoothing, plan.validation_steps))
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    stop = StopRequest(strategy, multi_worker, cfg.runtime.stop_check_every_steps, cfg.runtime.stop_check_seconds)
    on_backup = telemetry.backup_finished if telemetry is not None else None
    # Last, so an epoch-end backup records an epoch whose end the other callbacks have handled.
    backups = Backups(backup, cfg.train.backup_every_steps, plan.steps_per_epoch, resumed_steps, stop, on_backup)
    callbacks.append(backups)
    started = time.perf_counter()
    stop.install()
    try:
        history = fit_from_position(
            model, train_data, plan.config.epochs, plan.steps_per_epoch, position, callbacks, backups, early,
            cfg.runtime.verbose,
        )  # fmt: skip
    finally:
        stop.uninstall()  # also when fit fails: a SIGTERM during the exit must end the process again
        backup.close()
    keep_best.finish()
    # The chief's log holds every epoch of the phase, including those before a restart.
    rows = [r for r in metrics_log.rows if r["phase"] == plan.name] if is_chief else _history_rows(history)
    return PhaseResult(
        epochs_run=len(rows),
        best_epoch=keep_best.best_epoch,
        best_value=keep_best.best,
        best_score=list(keep_best.best_score) if keep_best.best_score is not None else None,
        seconds=round(time.perf_counter() - started, 2),
        history=rows,
    )


def fit_from_position(
    model: keras.Model,
    train_data,
    epochs: int,
    steps_per_epoch: int,
    position: Position | None,
    callbacks: list,
    backups: Backups,
    early: EarlyStopping | None = None,
    verbose: int = 0,
    **fit_args,
) -> dict[str, list[float]]:
    """``model.fit`` over the segments that finish a phase from a restored ``position``; the joined history.

    A phase resumed mid-epoch takes two fits: the rest of that epoch, then the epochs after it.
    ``fit_args`` go to every fit.
    """
    history: dict[str, list[float]] = {}
    for segment in segments(position, epochs, steps_per_epoch):
        backups.begin_segment(segment)
        fitted = model.fit(
            train_data,
            initial_epoch=segment.initial_epoch,
            epochs=segment.end_epoch,
            steps_per_epoch=segment.steps,
            callbacks=callbacks,
            verbose=verbose,
            **fit_args,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(values)
        if early is not None and early.stopped_epoch is not None:
            break
    return history


def _history_rows(history: dict[str, list[float]]) -> list[dict[str, float]]:
    epochs = len(next(iter(history.values()), []))
    return [{key: float(values[i]) for key, values in history.items()} for i in range(epochs)]


def _log_resumed(position: Position | None, plan: PhasePlan) -> None:
    if position is None:
        return
    steps = plan.steps_per_epoch
    done = min(position.steps_done, steps)
    where = "its end" if done == steps else f"step {done} of {steps}"
    log.info(
        "resumed from backup: epoch %d at %s (%d steps of this phase done before)",
        position.epoch + 1,
        where,
        position.phase_steps,
    )
