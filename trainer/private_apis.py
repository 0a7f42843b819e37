"""The private APIs of TensorFlow, tf-keras and the Google client libraries the trainer still uses.

Each one is here, with why no public API does the job, so that an upgrade that moves one breaks
in one place: tests/test_private_apis.py checks every entry of ``PRIVATE_APIS`` on the installed
versions and fails naming the API. Not yet here (issue 16, "resume and preemption on public
APIs"): ``trainer.train.callbacks.BackupAndRestore`` subclasses tf-keras' callback and uses its
``_training_state``, ``_batches_count``, ``_current_epoch`` and ``_backup``, and
``trainer.train.telemetry`` wraps ``optimizer.apply_gradients``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: name -> why it is needed (no public equivalent). The test resolves each name.
PRIVATE_APIS = {
    "tensorflow.python.eager.context.Context.configure_coordination_service": (
        "the only way to set the coordination service's heartbeat and registration timeouts "
        "before MultiWorkerMirroredStrategy starts it (tf.distribute uses the same call)"
    ),
    "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2.CoordinatedJob": ("the job list that call takes"),
    "tensorflow.python.checkpoint.checkpoint_management.CheckpointManager._max_to_keep": (
        "tf-keras' BackupAndRestore builds its CheckpointManagers with max_to_keep=1 and no setter; "
        "the trainer keeps train.backups_to_keep complete backups"
    ),
    "tf_keras.src.distribute.worker_training_state.WorkerTrainingState._ckpt_saved_epoch": (
        "where a restored backup resumes (epoch), to log it and to clamp it to a changed epoch length"
    ),
    "tf_keras.src.distribute.worker_training_state.WorkerTrainingState._ckpt_saved_batch": (
        "where a restored backup resumes (step within the epoch)"
    ),
    "tf_keras.Model._train_counter": "the steps a restored phase had done (Model.optimizer.iterations counts "
    "optimizer steps of every phase's optimizer, not this fit's)",
    "google.cloud.storage.retry.DEFAULT_RETRY._predicate": (
        "the library's own notion of a transient storage error, used with the trainer's retry budget"
    ),
    "google.cloud.storage.Client._credentials": (
        "which identity the calls run as, for error messages (its e-mail or kind, never a secret)"
    ),
    "tf_keras.src.applications.vgg16.WEIGHTS_PATH_NO_TOP": (
        "where VGG16(weights='imagenet', include_top=False) downloads from; the image bakes that file "
        "so the Keras cache finds it (tests/chart/test_chart_image.py compares it to the Dockerfile)"
    ),
    "tf_keras.src.applications.vgg16.VGG16.__code__": (
        "the MD5 Keras checks the notop file against is a literal inside VGG16(); a baked file with "
        "another hash would be downloaded again (which fails on an air-gapped cluster)"
    ),
}


def configure_coordination_service(num_workers: int, heartbeat_timeout_ms: int, register_timeout_ms: int) -> None:
    from tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2 import CoordinatedJob
    from tensorflow.python.eager import context

    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader="/job:worker/replica:0/task:0",
        coordinated_jobs=[CoordinatedJob(name="worker", num_tasks=num_workers)],
        heartbeat_timeout_in_ms=heartbeat_timeout_ms,
        cluster_register_timeout_in_ms=register_timeout_ms,
    )


def set_checkpoints_to_keep(manager: Any, keep: int) -> None:
    manager._max_to_keep = keep


def backup_position(training_state: Any) -> tuple[int, int]:
    """(epoch, step) a tf-keras WorkerTrainingState restored; epoch -1 when nothing was restored."""
    return int(training_state._ckpt_saved_epoch.numpy()), int(training_state._ckpt_saved_batch.numpy())


def set_backup_step(training_state: Any, step: int) -> None:
    training_state._ckpt_saved_batch.assign(step)


def train_counter(model: Any) -> int:
    return int(model._train_counter.numpy())


def storage_transient_predicate() -> Callable[[BaseException], bool]:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY._predicate


def storage_credentials(client: Any) -> Any:
    return client._credentials


def vgg16_notop_weights() -> tuple[str, str]:
    """(URL, MD5) of the file tf-keras' VGG16(include_top=False, weights="imagenet") fetches and checks.

    The MD5 is the string constant that follows the notop file name among VGG16's constants (the
    order get_file's arguments appear in its source); ValueError when that layout changes.
    """
    import re

    from tf_keras.src.applications import vgg16

    url = vgg16.WEIGHTS_PATH_NO_TOP
    constants = [c for c in vgg16.VGG16.__code__.co_consts if isinstance(c, str)]
    name = url.rsplit("/", 1)[1]
    if name not in constants[:-1] or not re.fullmatch(r"[0-9a-f]{32}", md5 := constants[constants.index(name) + 1]):
        raise ValueError(f"tf_keras VGG16 no longer names {name} followed by its MD5")
    return url, md5
