"""trainer.strategy: which tf.distribute strategy, mixed precision."""

from __future__ import annotations

import pytest

from trainer.cluster import make_tf_config, parse_tf_config, single_process
from trainer.config import RuntimeConfig
from trainer.strategy import choose_strategy_kind, communication_options, precision_policy

TWO_WORKERS = parse_tf_config(make_tf_config(["w0:2222", "w1:2222"], 0))
ONE_WORKER_CLUSTER = parse_tf_config(make_tf_config(["w0:2222"], 0))


@pytest.mark.parametrize(
    ("cluster", "local_devices", "kind"),
    [
        (single_process(), 0, "one_device"),
        (single_process(), 1, "one_device"),
        (single_process(), 4, "mirrored"),
        (ONE_WORKER_CLUSTER, 2, "mirrored"),
        (TWO_WORKERS, 0, "multi_worker"),
        (TWO_WORKERS, 4, "multi_worker"),
        (single_process(), 2, "mirrored"),  # 2 GPUs, or runtime.cpu_devices=2 on a CPU
    ],
)
def test_choose_strategy_kind(cluster, local_devices, kind):
    assert choose_strategy_kind(cluster, local_devices) == kind


@pytest.mark.parametrize(
    ("setting", "num_gpus", "expected"),
    [
        ("auto", 0, None),  # CPUs have no fast float16
        ("auto", 1, "mixed_float16"),
        ("auto", 8, "mixed_float16"),
        ("on", 0, "mixed_float16"),
        ("on", 2, "mixed_float16"),
        ("off", 0, None),
        ("off", 2, None),
        ("mixed_bfloat16", 0, "mixed_bfloat16"),
        ("mixed_float16", 0, "mixed_float16"),
    ],
)
def test_precision_policy(setting, num_gpus, expected):
    assert precision_policy(setting, num_gpus) == expected


@pytest.mark.parametrize(
    ("setting", "pack_mb", "implementation", "pack_bytes"),
    [("auto", 0.0, "AUTO", 0), ("nccl", 32.0, "NCCL", 32 * 2**20), ("ring", 0.5, "RING", 2**19)],
)
def test_communication_options_follow_the_runtime_config(setting, pack_mb, implementation, pack_bytes):
    runtime = RuntimeConfig(all_reduce=setting, all_reduce_pack_mb=pack_mb, collective_timeout_seconds=90.0)

    options = communication_options(runtime)

    assert options.implementation.name == implementation
    assert options.bytes_per_pack == pack_bytes
    assert options.timeout_seconds == 90.0
