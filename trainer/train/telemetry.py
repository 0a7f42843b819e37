"""Training telemetry: what the Keras loop does, turned into the metrics of trainer.metrics.

Three probes feed one Keras callback:

- the input pipeline stamps each training batch as it leaves the pipeline (a tiny
  ``tf.py_function`` after the last prefetch) and carries the bytes of its records;
- the training step (``trainer.model.Classifier``) stamps the moment this worker's gradients
  are ready, before the all-reduce;
- the callback times each step (batch begin to batch end).

Per step: input wait = batch arrival - step start (0 when the batch was already buffered;
not counted in the first step of each phase, which also traces the step function);
compute = gradients ready - max(step start, batch arrival). In synchronous training every
worker's *step* takes as long as the slowest worker's, so the step time cannot show a
straggler; its compute time can. Under XLA (``runtime.jit_compile``) every figure stays: XLA
compiles the step's compute, and the stamp runs between it and the all-reduce.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import time
from dataclasses import dataclass, field

import tensorflow as tf
import tf_keras as keras

from trainer import model as model_lib
from trainer import storage
from trainer.metrics import TrainerMetrics
from trainer.train.callbacks import current_learning_rate

log = logging.getLogger(__name__)

#: Gauges that need a TensorFlow call (learning rate, accelerator memory) refresh at most this often.
SLOW_GAUGE_SECONDS = 1.0


class StepProbe:
    """Timestamps from inside the TensorFlow step, read by the callback after each step."""

    def __init__(self) -> None:
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._ready: collections.deque[float] = collections.deque()

    # -- the input pipeline
    def stamp_dataset(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """(images, labels, record_bytes) batches -> (images, labels), stamping each batch.

        Must be the pipeline's last stage (after prefetch): the stamp then runs when the
        training loop (or tf.distribute's per-device buffer) takes the batch.
        """

        def stamp(images, labels, record_bytes):
            token = tf.py_function(self._batch_arrived, [tf.reduce_sum(record_bytes)], Tout=tf.int64)
            with tf.control_dependencies([token]):
                return tf.identity(images), labels

        return dataset.map(stamp)

    def _batch_arrived(self, record_bytes) -> int:
        self._arrivals.append((time.perf_counter(), int(record_bytes)))
        return 0

    # -- the training step (trainer.model.Classifier.gradients_ready)
    def gradients_ready(self) -> int:
        """Called by the step, between this worker's backward pass and the all-reduce."""
        self._ready.append(time.perf_counter())
        return 0

    # -- the callback
    def reset(self) -> None:
        self._arrivals.clear()
        self._ready.clear()

    def take(self, replicas: int) -> tuple[float | None, int, float | None]:
        """(latest batch arrival, record bytes, latest gradients-ready time) of one step.

        Each step consumes one batch per local replica; stamps come in order, so the oldest
        ``replicas`` of each queue belong to the step that just ended.
        """
        arrivals = [self._arrivals.popleft() for _ in range(min(replicas, len(self._arrivals)))]
        ready = [self._ready.popleft() for _ in range(min(replicas, len(self._ready)))]
        arrived = max((t for t, _ in arrivals), default=None)
        return arrived, sum(n for _, n in arrivals), max(ready, default=None)


@dataclass
class RunTelemetry:
    """What the phases need to report: the metrics, the probe and the run's shape."""

    metrics: TrainerMetrics
    num_workers: int
    local_replicas: int
    total_steps: int  # planned steps of the whole run (both phases)
    probe: StepProbe = field(default_factory=StepProbe)

    def instrument(self, callbacks: list, model: keras.Model, plan, resumed_steps: int = 0) -> None:
        """Add the telemetry callback for ``plan`` (a PhasePlan) to ``callbacks``; stamp the step.

        ``resumed_steps``: the steps of the phase a restored backup had done. Backups report
        to ``backup_finished`` (the backup callback's ``on_backup`` hook).
        """
        if isinstance(model, model_lib.Classifier):
            model.gradients_ready = self.probe.gradients_ready
        callbacks.insert(0, TrainingTelemetry(self, plan, resumed_steps))

    def backup_finished(self, seconds: float, ok: bool) -> None:
        if ok:
            self.metrics.backup_duration.observe(seconds)
            self.metrics.backup_last_success.set(time.time())
        else:
            self.metrics.backup_failures.inc()

    def run_finished(self) -> None:
        """Training is over (early stopping may have ended it before the planned steps)."""
        self.metrics.progress.set(1.0)
        self.metrics.eta.set(0)


class TrainingTelemetry(keras.callbacks.Callback):
    """Updates the training metrics after every step and epoch of one phase."""

    def __init__(self, run: RunTelemetry, plan, resumed_steps: int = 0):
        super().__init__()
        self.run, self.m = run, run.metrics
        self.phase, self.first_step = plan.name, plan.first_global_step
        self.images_per_step = plan.global_batch // max(run.num_workers, 1)
        self.phase_steps = resumed_steps  # steps of this phase done, including those before a restore
        if resumed_steps:
            self.m.restores.inc()
            log.info("telemetry: phase %s resumed after %d steps", self.phase, resumed_steps)
        self._step_began = 0.0
        self._first_step_ended: float | None = None
        self._steps_since_first = 0
        self._slow_refreshed = -math.inf

    def on_train_begin(self, logs=None):
        self.run.probe.reset()
        self.m.set_phase(self.phase)
        self.m.global_step.set(self.first_step + self.phase_steps)
        self._progress(self.first_step + self.phase_steps)

    def on_epoch_begin(self, epoch, logs=None):
        self.m.epoch.set(epoch + 1)

    def on_train_batch_begin(self, batch, logs=None):
        self._step_began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        ended = time.perf_counter()
        began = self._step_began
        self.m.step_duration.observe(ended - began)
        self.m.images.inc(self.images_per_step)
        arrived, record_bytes, ready = self.run.probe.take(self.run.local_replicas)
        if arrived is not None:
            # The first step of a fit also traces the step function before it asks for a batch:
            # that time is not input wait.
            if self._first_step_ended is not None:
                self.m.input_wait.inc(max(arrived - began, 0.0))
            self.m.storage_read.inc(record_bytes)
        if ready is not None:
            self.m.step_compute.observe(max(ready - max(began, arrived or began), 0.0))
        self.phase_steps += 1
        step = self.first_step + self.phase_steps
        self.m.global_step.set(step)
        self._pace(ended)
        self._progress(step)
        self._train_scores(logs or {})
        if ended - self._slow_refreshed >= SLOW_GAUGE_SECONDS:
            self._slow_refreshed = ended
            self._refresh_slow_gauges()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._train_scores(logs)
        validation = {k.removeprefix("val_"): v for k, v in logs.items() if k.startswith("val_")}
        self.m.set_evaluation("validation", validation)

    def _train_scores(self, logs: dict) -> None:
        self.m.set_evaluation("train", {k: v for k, v in logs.items() if k in ("loss", "accuracy")})

    def _pace(self, ended: float) -> None:
        """Seconds per step since this process's first step (compilation excluded), validation included."""
        if self._first_step_ended is None:
            self._first_step_ended = ended
            return
        self._steps_since_first += 1
        seconds_per_step = (ended - self._first_step_ended) / self._steps_since_first
        left = max(self.run.total_steps - (self.first_step + self.phase_steps), 0)
        self.m.eta.set(left * seconds_per_step)

    def _progress(self, step: int) -> None:
        if self.run.total_steps:
            self.m.progress.set(min(step / self.run.total_steps, 1.0))

    def _refresh_slow_gauges(self) -> None:
        self.m.learning_rate.set(current_learning_rate(self.model.optimizer))
        for index, _ in enumerate(tf.config.list_physical_devices("GPU")):
            name = f"GPU:{index}"  # this process's GPUs, however the cluster names its devices
            self.m.accelerator_memory.labels(device=name).set(tf.config.experimental.get_memory_info(name)["current"])


# --------------------------------------------------------------------------- group restarts


def count_attempt(path: str, is_chief: bool) -> int:
    """This start's number (1 = the first) from the run's attempts record; the chief bumps it.

    Other workers read it without waiting for the chief, so theirs may lag by one: dashboards
    and alerts take the maximum over the run's workers.
    """
    attempts = 0
    if storage.exists(path):
        try:
            attempts = int(json.loads(storage.read_text(path)).get("attempts", 0))
        except (ValueError, TypeError, AttributeError):
            log.warning("%s is unreadable; counting this start as the first", path)
    if is_chief:
        attempts += 1
        storage.write_text(path, json.dumps({"attempts": attempts}) + "\n")
    return max(attempts, 1)
