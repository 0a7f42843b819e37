"""Pick and build the tf.distribute strategy from the environment.

- TF_CONFIG naming more than one worker -> MultiWorkerMirroredStrategy (synchronous,
  all-reduce across processes; every worker must run the same program).
- otherwise, several local GPUs -> MirroredStrategy; one GPU or CPU -> the default strategy.
- without GPUs, ``runtime.cpu_devices: N`` splits the CPU into N logical devices, one replica
  each, so a CPU machine runs the code paths of N GPUs per worker (for tests).

The strategy must be built before any other TensorFlow op runs in the process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from trainer.cluster import ClusterSpec
from trainer.config import RuntimeConfig

log = logging.getLogger(__name__)

StrategyKind = Literal["one_device", "mirrored", "multi_worker"]


def choose_strategy_kind(cluster: ClusterSpec, local_devices: int) -> StrategyKind:
    """``local_devices``: this worker's GPUs, or its logical CPU devices (runtime.cpu_devices) without GPUs."""
    if cluster.is_multi_worker:
        return "multi_worker"
    return "mirrored" if local_devices > 1 else "one_device"


def precision_policy(setting: str, num_gpus: int) -> str | None:
    """The Keras mixed-precision policy; None for float32.

    ``auto`` turns mixed_float16 on only where it pays: on GPUs (CPUs have no fast float16).
    """
    if setting in ("mixed_float16", "mixed_bfloat16"):
        return setting
    if setting == "on" or (setting == "auto" and num_gpus > 0):
        return "mixed_float16"
    return None


@dataclass
class Distribution:
    strategy: object  # tf.distribute.Strategy
    kind: StrategyKind
    cluster: ClusterSpec
    num_gpus: int
    precision: str | None  # the mixed-precision policy, None for float32
    local_devices: int = 1  # replicas of this worker: its GPUs, or its logical CPU devices

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def mixed_precision(self) -> bool:
        return self.precision is not None


def build_distribution(cluster: ClusterSpec, runtime: RuntimeConfig) -> Distribution:
    import tensorflow as tf

    num_gpus = len(tf.config.list_physical_devices("GPU"))
    cpu_devices = _split_cpu(runtime.cpu_devices) if num_gpus == 0 else 1
    local_devices = num_gpus or cpu_devices
    kind = choose_strategy_kind(cluster, local_devices)
    if kind == "multi_worker":
        _configure_coordination(cluster, runtime)
        strategy = _multi_worker_strategy(runtime, cpu_devices)
    elif kind == "mirrored":
        # On GPUs MirroredStrategy finds them itself; logical CPU devices must be named.
        devices = None if num_gpus else [f"/cpu:{i}" for i in range(cpu_devices)]
        strategy = tf.distribute.MirroredStrategy(devices)
    else:
        # The default strategy: one device (the GPU if there is one).
        strategy = tf.distribute.get_strategy()
    policy = precision_policy(runtime.mixed_precision, num_gpus)
    if policy is not None:
        import tf_keras

        tf_keras.mixed_precision.set_global_policy(policy)
    log.info(
        "strategy %s: %d replica(s) over %d worker(s), %d GPU(s) here%s, mixed precision %s",
        kind,
        strategy.num_replicas_in_sync,
        cluster.num_workers,
        num_gpus,
        f" ({cpu_devices} logical CPU devices)" if cpu_devices > 1 else "",
        policy or "off",
    )
    return Distribution(strategy, kind, cluster, num_gpus, policy, local_devices)


def _split_cpu(count: int) -> int:
    """Give this process ``count`` logical CPU devices (before TensorFlow initialises its devices)."""
    if count <= 1:
        return 1
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return count


def _multi_worker_strategy(runtime: RuntimeConfig, cpu_devices: int):
    import tensorflow as tf

    options = communication_options(runtime)
    if cpu_devices == 1:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    from trainer import private_apis  # MultiWorkerMirroredStrategy takes one CPU device per worker

    with private_apis.collective_cpu_devices(cpu_devices):
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def sum_over_workers(strategy):
    """A compiled all-reduce of one float over every replica: how workers agree, and meet.

    Collective: every worker must call it the same number of times (a barrier when the value
    does not matter; "did anyone get SIGTERM?" when it does).
    """
    import tensorflow as tf

    @tf.function
    def total(value):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(value,)), axis=None)

    return total


def communication_options(runtime: RuntimeConfig):
    """How MultiWorkerMirroredStrategy all-reduces: implementation, pack size, timeout.

    Keras all-reduces the gradients with the strategy's default options, so these apply to
    every training step. (MirroredStrategy, one machine with several GPUs, keeps NCCL's
    own defaults.)
    """
    import tensorflow as tf

    implementation = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        bytes_per_pack=int(runtime.all_reduce_pack_mb * 2**20),
        timeout_seconds=runtime.collective_timeout_seconds,
        implementation={"auto": implementation.AUTO, "nccl": implementation.NCCL, "ring": implementation.RING}[
            runtime.all_reduce
        ],
    )


def _configure_coordination(cluster: ClusterSpec, runtime: RuntimeConfig) -> None:
    """Bound how long a dead or frozen peer can go unnoticed, and how long a new group may take to form.

    MultiWorkerMirroredStrategy starts TensorFlow's coordination service (hosted by worker 0)
    with default timeouts when none is configured; configuring it first sets ours: a worker
    whose heartbeats stop for ``heartbeat_timeout_seconds`` fails every worker with an error,
    and a group whose members do not all register within ``peer_wait_seconds`` fails instead
    of waiting (TensorFlow's default is an hour).
    """
    from trainer import private_apis  # the public API has no way to set these

    private_apis.configure_coordination_service(
        cluster.num_workers, int(runtime.heartbeat_timeout_seconds * 1000), int(runtime.peer_wait_seconds * 1000)
    )
