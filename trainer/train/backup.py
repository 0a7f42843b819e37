"""A phase's resumable backups, on TensorFlow's public checkpoint API.

A backup is a ``tf.train.Checkpoint`` of the model (its weights, and through the model its
optimizer: slots, step counter, the loss scale under mixed precision) and of where the phase
was: the epoch, the steps of that epoch done, and the steps of the phase done. A
``tf.train.CheckpointManager`` numbers them, keeps the last ``keep`` and writes its small
``checkpoint`` state file after all of a backup's files: that file is the commit marker. A
restart restores the newest backup the marker names, so a backup interrupted mid-write (on
GCS, where a checkpoint's "rename" is a copy and a delete of many objects) is never restored,
and keeping more than one leaves an older complete backup should the newest be damaged later.

Under MultiWorkerMirroredStrategy every worker takes part in every save (reading distributed
variables is collective). Only the chief's copy is kept, in ``<dir>/chief``; the others write
theirs into a private local temporary directory that is thrown away, as TensorFlow's
multi-worker custom-loop tutorial does with its ``workertemp`` directories. Every worker
restores from the chief's copy.

Why not TensorFlow's ``PreemptionCheckpointHandler``: it aligns the workers inside
``handler.run(step_fn)``, a wrapper of each step of a custom training loop, and supports only
MultiWorkerMirroredStrategy and TPUStrategy. The phases run ``model.fit`` (with every
strategy, the default one included), whose loop offers no such wrapper; tf-keras reaches the
handler only through its own ``BackupAndRestore`` and that callback's private state, which is
what this module replaces. The trainer keeps the handler's design: one checkpoint with the
position in it, written by all workers at a step they agreed on (``StopRequest``, between
steps, every ``stop_check_*``), then an exit with the code the chart restarts on (76).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass

import tensorflow as tf

from trainer import storage

log = logging.getLogger(__name__)

#: Subdirectory of a phase's backup directory that holds the chief's (the kept) copy.
KEPT_COPY = "chief"


@dataclass(frozen=True)
class Position:
    """Where a restored backup resumes."""

    epoch: int  # 0-based epoch the backup was taken in
    steps_done: int  # steps of that epoch done when it was taken
    phase_steps: int  # steps of the phase done, over every epoch


class PhaseBackup:
    """Saves and restores one phase's model, optimizer and position."""

    def __init__(self, directory: str, model, keep: int, is_chief: bool):
        self.directory = storage.join(directory, KEPT_COPY)
        # Plain (not distributed) variables: every worker holds the same position.
        with tf.init_scope():
            self._epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="backup_epoch")
            self._steps_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="backup_steps_done")
            self._phase_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="backup_phase_steps")
        self.checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=model.optimizer,
            epoch=self._epoch,
            steps_done=self._steps_done,
            phase_steps=self._phase_steps,
        )
        self._scratch = None if is_chief else tempfile.mkdtemp(prefix="trainer-backup-copy-")
        write_to, kept = (self.directory, keep) if is_chief else (self._scratch, 1)
        self._manager = tf.train.CheckpointManager(self.checkpoint, write_to, max_to_keep=kept)

    def restore(self) -> Position | None:
        """Load the newest complete backup of the phase; None when there is none."""
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is None:
            return None
        # Optimizer slots that do not exist yet are filled in when the first step creates them.
        self.checkpoint.restore(latest).expect_partial()
        return Position(int(self._epoch.numpy()), int(self._steps_done.numpy()), int(self._phase_steps.numpy()))

    def save(self, position: Position) -> None:
        """Write a backup at ``position``. Collective under MultiWorkerMirroredStrategy: every worker calls it."""
        self._epoch.assign(position.epoch)
        self._steps_done.assign(position.steps_done)
        self._phase_steps.assign(position.phase_steps)
        self._manager.save()

    def close(self) -> None:
        """Throw away this worker's unkept copy (no-op on the chief)."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


@dataclass(frozen=True)
class Segment:
    """One ``model.fit`` call of a phase: epochs [initial_epoch, end_epoch), ``steps`` steps each.

    ``skipped`` steps of the first epoch were done before a restart: a resumed epoch runs
    only the rest (Keras' fit has no public way to start an epoch mid-way).
    """

    initial_epoch: int
    end_epoch: int
    steps: int
    skipped: int = 0


def segments(position: Position | None, epochs: int, steps_per_epoch: int) -> list[Segment]:
    """The fits that finish a phase of ``epochs`` x ``steps_per_epoch`` from ``position``.

    A run relaunched with more workers has fewer (larger) steps per epoch: steps done beyond
    the new epoch's end mean that epoch is done, so the run resumes at the next one.
    """
    if position is None:
        return [Segment(0, epochs, steps_per_epoch)] if epochs > 0 else []
    if position.steps_done >= steps_per_epoch:
        start = position.epoch + 1
        return [Segment(start, epochs, steps_per_epoch)] if start < epochs else []
    rest = Segment(position.epoch, position.epoch + 1, steps_per_epoch - position.steps_done, position.steps_done)
    following = segments(Position(position.epoch, steps_per_epoch, position.phase_steps), epochs, steps_per_epoch)
    return [rest, *following] if position.epoch < epochs else []
