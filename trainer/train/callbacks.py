"""Keras callbacks of a training phase.

Every worker runs every callback (metrics are all-reduced, so decisions such as "new
best" or "stop early" agree everywhere); only the chief writes files.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from typing import Any

import numpy as np
import tf_keras as keras

from trainer import storage
from trainer.errors import Preempted

log = logging.getLogger(__name__)


def current_learning_rate(optimizer) -> float:
    lr = optimizer.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(optimizer.iterations)
    return float(keras.backend.get_value(lr))


def score(monitor: str, logs: dict[str, Any]) -> tuple[float, float] | None:
    """How good an epoch was, as a tuple where higher is better; None when not measured.

    Losses count negated. Accuracy ties (common on small validation sets, where accuracy
    saturates at 1.0) are broken by the matching loss, so the more confident model wins.
    """
    value = logs.get(monitor)
    if value is None or math.isnan(float(value)):
        return None
    if monitor.endswith("loss"):
        return (-float(value), 0.0)
    loss = logs.get(monitor.replace("accuracy", "loss"))
    return (float(value), -float(loss) if loss is not None and not math.isnan(float(loss)) else 0.0)


class EpochTimer(keras.callbacks.Callback):
    """Measures training time per epoch (validation excluded) and throughput."""

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch
        self.steps = 0
        self.train_seconds = 0.0
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.steps = 0
        self._started = time.perf_counter()
        self.train_seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.train_seconds = time.perf_counter() - self._started

    @property
    def images_per_second(self) -> float:
        return self.steps * self.global_batch / self.train_seconds if self.train_seconds else 0.0


class MetricsLog(keras.callbacks.Callback):
    """Appends one JSON object per epoch to ``metrics.jsonl`` (chief only).

    The whole file is rewritten each epoch, because object stores cannot append; it stays
    small (one line per epoch).
    """

    def __init__(self, path: str, phase: str, timer: EpochTimer, steps_per_epoch: int, is_chief: bool, first_step: int):
        super().__init__()
        self.path, self.phase, self.timer = path, phase, timer
        self.steps_per_epoch, self.is_chief, self.first_step = steps_per_epoch, is_chief, first_step
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, logs=None):
        if self.is_chief and storage.exists(self.path):
            self.rows = [json.loads(line) for line in storage.read_text(self.path).splitlines() if line.strip()]

    def on_epoch_end(self, epoch, logs=None):
        row = {
            "time": round(time.time(), 3),
            "phase": self.phase,
            "epoch": epoch + 1,
            "global_step": self.first_step + (epoch + 1) * self.steps_per_epoch,
            "learning_rate": current_learning_rate(self.model.optimizer),
            "train_seconds": round(self.timer.train_seconds, 3),
            "images_per_second": round(self.timer.images_per_second, 2),
            **{k: float(v) for k, v in (logs or {}).items()},
        }
        log.info("%s epoch %d: %s", self.phase, epoch + 1, _format_metrics(row))
        if self.is_chief:
            self.rows.append(row)
            storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))


def _format_metrics(row: dict[str, Any]) -> str:
    keys = ["loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "images_per_second"]
    return ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


class KeepBest(keras.callbacks.Callback):
    """Keeps the weights of the best epoch and restores them when the phase ends.

    ``baseline`` is the previous phase's best score: a fine-tuning phase that never beats
    it ends with the weights it started from, so the run's final model is the best one
    validated in any phase. The chief also writes new bests (``best/<phase>.weights.h5``
    plus a JSON record), so a restarted run keeps the best-so-far of an interrupted phase.
    """

    def __init__(
        self,
        monitor: str,
        weights_path: str,
        record_path: str,
        is_chief: bool,
        save_weights,
        baseline: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.monitor, self.weights_path, self.record_path = monitor, weights_path, record_path
        self.is_chief, self._save_weights = is_chief, save_weights
        self.baseline = tuple(baseline) if baseline is not None else None
        self.best_score: tuple[float, float] | None = self.baseline
        self.best_epoch: int | None = None  # None: no epoch of this phase beat the baseline
        self.best_weights: list[np.ndarray] | None = None

    @property
    def best(self) -> float | None:
        """The monitored value of the best epoch (as logged, not negated)."""
        if self.best_score is None:
            return None
        return -self.best_score[0] if self.monitor.endswith("loss") else self.best_score[0]

    def start(self, model: keras.Model, load_weights) -> None:
        """Call before fit (before any backup is restored): the model holds the phase's start weights.

        Remembers them as the baseline's weights, then, after a restart, picks up the best of
        the interrupted phase if one was recorded.
        """
        self.set_model(model)
        if self.baseline is not None:
            self.best_weights = model.get_weights()
        if not storage.exists(self.record_path):
            return
        record = json.loads(storage.read_text(self.record_path))
        current = model.get_weights()
        load_weights(model, self.weights_path)
        self.best_weights = model.get_weights()
        model.set_weights(current)
        self.best_score, self.best_epoch = tuple(record["score"]), record["epoch"]
        log.info("restored best-so-far of this phase: %s=%.4f at epoch %d", self.monitor, self.best, self.best_epoch)

    def on_epoch_end(self, epoch, logs=None):
        current = score(self.monitor, logs or {})
        if current is None or (self.best_score is not None and current <= self.best_score):
            return
        self.best_score, self.best_epoch = current, epoch + 1
        self.best_weights = self.model.get_weights()
        if self.is_chief:
            self._save_weights(self.model, self.weights_path)
            record = {"monitor": self.monitor, "value": self.best, "score": list(current), "epoch": self.best_epoch}
            storage.write_text(self.record_path, json.dumps(record))

    def on_train_end(self, logs=None):
        if self.best_weights is None:
            return
        self.model.set_weights(self.best_weights)
        if self.best_epoch is None:
            log.info(
                "no epoch beat the previous phase's %s=%.4f; keeping the weights the phase started from",
                self.monitor,
                self.best,
            )
        else:
            log.info("phase ends with its best epoch %d (%s=%.4f)", self.best_epoch, self.monitor, self.best)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' resumable backups, keeping the last ``keep`` complete ones.

    Each backup is a TensorFlow checkpoint; the small ``checkpoint`` state object, written
    after all of a backup's files, is its commit marker. A restart restores the newest
    backup the marker names, so a backup interrupted mid-write (on GCS, where a
    checkpoint's "rename" is a copy + delete of many objects) is never restored; keeping
    more than one leaves an older complete backup even if the newest is damaged later.
    """

    def __init__(self, backup_dir: str, save_freq: int, keep: int, backup_on_sigterm: bool = False):
        # delete_checkpoint=False: the run removes a phase's backup only after recording it complete.
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=False)
        self.keep = keep
        self.backup_on_sigterm = backup_on_sigterm
        self._sigterm = threading.Event()
        self._previous_handler = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state = self._training_state
        for manager in {id(m): m for m in (state.read_checkpoint_manager, state.write_checkpoint_manager)}.values():
            manager._max_to_keep = self.keep  # CheckpointManager has no public setter
        if self.backup_on_sigterm:
            # Note the signal and finish the current step; the backup is written between steps.
            self._previous_handler = signal.signal(signal.SIGTERM, lambda *_: self._sigterm.set())

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self._sigterm.is_set():
            started = time.perf_counter()
            self._backup(epoch=self._current_epoch, batch=batch)
            log.warning(
                "SIGTERM: backup written in %.1f s at epoch %d, step %d; stopping",
                time.perf_counter() - started,
                self._current_epoch + 1,
                batch + 1,
            )
            self._restore_handler()
            raise Preempted("received SIGTERM; backup written, the run resumes from it when restarted")

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self._restore_handler()

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None
