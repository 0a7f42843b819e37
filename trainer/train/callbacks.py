"""Keras callbacks of a training phase.

Every worker runs every callback (metrics are all-reduced, so decisions such as "new
best" or "stop early" agree everywhere); only the chief writes files.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer import signals, storage
from trainer.errors import Preempted
from trainer.strategy import sum_over_workers
from trainer.train.backup import PhaseBackup, Position, Segment

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


class FirstStepsEstimate(keras.callbacks.Callback):
    """Times the first steps of a phase (after the first, which traces the graph) and reports
    seconds per step once: how long the epochs and the phase will take, before they do."""

    def __init__(self, report: Callable[[float], None], measure_steps: int = 5):
        super().__init__()
        self.report, self.measure_steps = report, measure_steps
        self._started: float | None = None
        self._first = self._last = 0
        self._done = False

    def on_train_batch_end(self, batch, logs=None):
        if self._done:
            return
        now = time.perf_counter()
        if self._started is None:  # the end of the first step: tracing and warm-up are behind
            self._started, self._first = now, batch
        self._last, self._last_time = batch, now
        if self._last - self._first >= self.measure_steps:
            self._finish()

    def on_epoch_end(self, epoch, logs=None):
        if not self._done and self._last > self._first:  # a short epoch: what it had
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.report((self._last_time - self._started) / (self._last - self._first))


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
        if is_chief and storage.exists(path):  # a restarted run: the epochs logged before
            self.rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]

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
    """Keeps the weights of the best epoch and restores them when the phase ends (``finish``).

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

    def finish(self) -> None:
        """The phase is over (after its last fit: a resumed phase may take two): restore the best weights."""
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


class EarlyStopping(keras.callbacks.Callback):
    """Ends a phase ``patience`` epochs after its best epoch, as ``KeepBest`` scores epochs.

    An epoch counts as an improvement exactly when KeepBest keeps it (accuracy ties broken
    by the loss). With no improving epoch yet, patience counts from the phase's start, so a
    fine-tuning phase that never beats the frozen phase's best stops after ``patience``
    epochs. Nothing to back up: the best epoch is in KeepBest's record and the epochs done
    are in the restored backup, so a resumed phase stops at the same epoch as an
    uninterrupted one. Place it after KeepBest.
    """

    def __init__(self, keep_best: KeepBest, patience: int):
        super().__init__()
        self.keep_best, self.patience = keep_best, patience
        self.stopped_epoch: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done - (self.keep_best.best_epoch or 0) < self.patience:
            return
        self.stopped_epoch = done
        self.model.stop_training = True
        since = f"its best epoch {self.keep_best.best_epoch}" if self.keep_best.best_epoch else "the phase's start"
        log.info("early stopping after epoch %d: %d epoch(s) without improvement since %s", done, self.patience, since)


class StopRequest:
    """A SIGTERM seen by any worker, turned into one decision every worker takes at the same step.

    Synchronous training needs every worker in each step, and a backup under
    MultiWorkerMirroredStrategy is written by all workers together, so they must stop at the
    same step. On Kubernetes only the pods of a preempted node get SIGTERM; the others learn it
    here: each check all-reduces the local flag, so all see "someone was asked to stop" at the
    same step. Single-process runs just read the flag after every step.

    Checks come at least every ``every_steps`` steps and, when steps are slow, at least every
    ``every_seconds`` seconds (or after every step, when one step is slower than that). The
    interval is agreed, not guessed: each check also all-reduces the workers' step times
    (whole milliseconds, so the sum is exact and the same everywhere), and every worker derives
    the next interval from the same mean. The first check comes after the first step.
    """

    def __init__(self, strategy, multi_worker: bool, every_steps: int = 10, every_seconds: float = 10.0):
        self._signalled = threading.Event()
        self._any_worker = sum_over_workers(strategy) if multi_worker else None
        self._replicas = strategy.num_replicas_in_sync
        self._every_steps, self._every_seconds = every_steps, every_seconds
        self._interval = 1
        self._since_check = 0
        self._last_check = time.perf_counter()
        self._sigterm = signals.stop_requests(lambda _signum: self._signalled.set())  # SIGTERM only

    @property
    def interval_steps(self) -> int:
        """Steps between two checks, as last agreed."""
        return self._interval

    def install(self) -> None:
        # Only note the signal; the step in progress finishes and the backup is written between steps.
        self._sigterm.install()
        self._last_check, self._since_check = time.perf_counter(), 0

    def uninstall(self) -> None:
        self._sigterm.uninstall()  # idempotent; the handler below it (cli's Preempted) is back

    def agreed_after_step(self) -> bool:
        """``agreed()`` when the agreed interval has passed since the last check (it costs an all-reduce)."""
        self._since_check += 1
        return self._since_check >= self._interval and self.agreed()

    def agreed(self) -> bool:
        """True on every worker at once when at least one of them got SIGTERM. Collective."""
        if self._any_worker is None:
            return self._signalled.is_set()
        now = time.perf_counter()
        step_ms = round(1000 * (now - self._last_check) / max(self._since_check, 1))
        flag = 1.0 if self._signalled.is_set() else 0.0
        totals = self._any_worker(tf.constant([flag, float(step_ms)])).numpy()
        mean_step_seconds = float(totals[1]) / self._replicas / 1000  # each replica added its worker's figure
        by_time = int(self._every_seconds / mean_step_seconds) if mean_step_seconds > 0 else self._every_steps
        self._interval = max(1, min(self._every_steps, by_time))
        self._since_check, self._last_check = 0, time.perf_counter()
        return float(totals[0]) > 0


class Backups(keras.callbacks.Callback):
    """Backs a phase up every ``save_freq`` steps and at every epoch's end; stops on an agreed SIGTERM.

    A backup taken after an epoch's last step would resume at the next epoch, skipping
    whatever that epoch's end still had to do (validation, best-model tracking, the metrics
    log); so the last step is backed up at the epoch's end instead, by this callback placed
    after the others. ``begin_segment`` says which part of the phase a fit runs (a resumed epoch
    runs only the steps its backup had not done), so positions count from the epoch's start.
    """

    def __init__(
        self,
        backup: PhaseBackup,
        save_freq: int,
        steps_per_epoch: int,
        phase_steps: int = 0,
        stop: StopRequest | None = None,
        on_backup: Callable[[float, bool], None] | None = None,
    ):
        super().__init__()
        self.backup, self.save_freq, self.steps_per_epoch = backup, save_freq, steps_per_epoch
        self.phase_steps = phase_steps  # steps of the phase done, including those before a restore
        self.stop = stop
        self.on_backup = on_backup  # (seconds, succeeded) after every backup attempt, e.g. for metrics
        self.skipped = 0  # steps of the current epoch done before this fit (see begin_segment)
        self._since_backup = 0
        self._epoch = 0

    def begin_segment(self, segment: Segment) -> None:
        self.skipped = segment.skipped

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.phase_steps += 1
        if batch == self.params["steps"] - 1:
            return  # the epoch's end backs up
        self._since_backup += 1
        due = self._since_backup >= self.save_freq
        stopping = self.stop is not None and self.stop.agreed_after_step()
        if due or stopping:
            self._since_backup = 0
            seconds = self._timed_backup(Position(self._epoch, self.skipped + batch + 1, self.phase_steps))
        if stopping:
            self._preempted(seconds, self.skipped + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        # Every epoch end is backed up: a restart never repeats a finished epoch (its metrics
        # row, best-model decision and early-stopping count stay as they were).
        stopping = self.stop is not None and self.stop.agreed()
        seconds = self._timed_backup(Position(epoch, self.steps_per_epoch, self.phase_steps))
        self._since_backup, self.skipped = 0, 0
        if stopping:
            self._preempted(seconds, self.steps_per_epoch)

    def _timed_backup(self, position: Position) -> float:
        started = time.perf_counter()
        try:
            self.backup.save(position)
        except Exception:
            if self.on_backup is not None:
                self.on_backup(time.perf_counter() - started, False)
            raise
        seconds = time.perf_counter() - started
        if self.on_backup is not None:
            self.on_backup(seconds, True)
        return seconds

    def _preempted(self, seconds: float, step: int) -> None:
        log.warning(
            "SIGTERM (here or on a peer): backup written in %.1f s at epoch %d, step %d; stopping",
            seconds,
            self._epoch + 1,
            step,
        )
        self.stop.uninstall()
        raise Preempted("received SIGTERM; backup written, the run resumes from it when restarted")
