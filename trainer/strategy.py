"""Pick and build the tf.distribute strategy from the environment.

- TF_CONFIG naming more than one worker -> MultiWorkerMirroredStrategy (synchronous,
  all-reduce across processes; every worker must run the same program).
- otherwise, several local GPUs -> MirroredStrategy; one GPU or CPU -> OneDeviceStrategy.

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


def choose_strategy_kind(cluster: ClusterSpec, num_gpus: int) -> StrategyKind:
    if cluster.is_multi_worker:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "one_device"


def use_mixed_precision(setting: str, num_gpus: int) -> bool:
    """`auto` turns mixed_float16 on only where it pays: on GPUs (CPUs have no fast fp16)."""
    return setting == "on" or (setting == "auto" and num_gpus > 0)


@dataclass
class Distribution:
    strategy: object  # tf.distribute.Strategy
    kind: StrategyKind
    cluster: ClusterSpec
    num_gpus: int
    mixed_precision: bool

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def build_distribution(cluster: ClusterSpec, runtime: RuntimeConfig) -> Distribution:
    import tensorflow as tf

    num_gpus = len(tf.config.list_physical_devices("GPU"))
    kind = choose_strategy_kind(cluster, num_gpus)
    if kind == "multi_worker":
        _configure_coordination(cluster, runtime)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=communication_options(runtime))
    elif kind == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    else:
        # The default strategy: one device (the GPU if there is one).
        strategy = tf.distribute.get_strategy()
    mixed = use_mixed_precision(runtime.mixed_precision, num_gpus)
    if mixed:
        import tf_keras

        tf_keras.mixed_precision.set_global_policy("mixed_float16")
    log.info(
        "strategy %s: %d replica(s) over %d worker(s), %d GPU(s) here, mixed precision %s",
        kind,
        strategy.num_replicas_in_sync,
        cluster.num_workers,
        num_gpus,
        "on" if mixed else "off",
    )
    return Distribution(strategy, kind, cluster, num_gpus, mixed)


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
