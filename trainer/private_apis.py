"""The private APIs of TensorFlow, tf-keras and the Google client libraries the trainer still uses.

Each one is here, with why no public API does the job, so that an upgrade that moves one breaks
in one place: tests/test_private_apis.py checks every entry of ``PRIVATE_APIS`` on the installed
versions and fails naming the API. No other module of the trainer reads a private attribute of
TensorFlow, tf-keras or the Google clients (backups are ``tf.train.Checkpoint`` +
``CheckpointManager`` in trainer.train.backup; the gradient stamp is a ``train_step`` in
trainer.model).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

#: name -> why it is needed (no public equivalent). The test resolves each name.
PRIVATE_APIS = {
    "tensorflow.python.eager.context.Context.configure_coordination_service": (
        "the only way to set the coordination service's heartbeat and registration timeouts "
        "before MultiWorkerMirroredStrategy starts it (tf.distribute uses the same call)"
    ),
    "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2.CoordinatedJob": ("the job list that call takes"),
    "tensorflow.python.eager.context.Context.get_task_states": (
        "the coordination service's view of each worker's health (tf.distribute's ClusterCoordinator "
        "polls it the same way): how worker 0, when it is blocked outside any collective, learns that "
        "its group failed; trainer.group_watch"
    ),
    "tensorflow.python.distribute.collective_all_reduce_strategy.CollectiveAllReduceExtended"
    "._initialize_local_devices": (
        "MultiWorkerMirroredStrategy gives a worker without GPUs one CPU device; runtime.cpu_devices "
        "(several logical CPU devices per worker, to run the several-GPUs-per-worker path on CPU) "
        "replaces that choice while the strategy is built"
    ),
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


def coordination_task_states(num_workers: int) -> list:
    """Each worker's state in the coordination service: None if healthy.

    Holds Python's GIL while it waits for the service: call it only where the service runs (worker 0).
    """
    from tensorflow.python.eager import context

    return list(context.context().get_task_states([("worker", num_workers)]))


@contextlib.contextmanager
def collective_cpu_devices(count: int) -> Iterator[None]:
    """While building a MultiWorkerMirroredStrategy: ``count`` local CPU devices per worker, not one."""
    from tensorflow.python.distribute.collective_all_reduce_strategy import CollectiveAllReduceExtended

    original = CollectiveAllReduceExtended._initialize_local_devices

    def cpu_devices(self, cluster_resolver, worker_device):
        return tuple(f"{worker_device}/device:CPU:{i}" for i in range(count)), "CPU"

    CollectiveAllReduceExtended._initialize_local_devices = cpu_devices
    try:
        yield
    finally:
        CollectiveAllReduceExtended._initialize_local_devices = original


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
