"""Who am I in the cluster? Pure functions over TF_CONFIG (no TensorFlow import).

tf.distribute describes a multi-worker cluster with the TF_CONFIG environment variable:
``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}``.
Worker 0 is the chief unless the cluster names an explicit ``chief`` task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from trainer.errors import ConfigError


@dataclass(frozen=True)
class ClusterSpec:
    workers: tuple[str, ...]  # every task's address, chief first
    task_type: str
    task_index: int
    has_chief: bool = False  # the cluster names an explicit "chief" task

    @property
    def num_workers(self) -> int:
        return max(len(self.workers), 1)

    @property
    def is_multi_worker(self) -> bool:
        return self.num_workers > 1

    @property
    def worker_index(self) -> int:
        """This task's position among all tasks (chief first): 0..num_workers-1."""
        if self.task_type == "chief":
            return 0
        offset = 1 if self.task_type == "worker" and self.has_chief else 0
        return self.task_index + offset

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0


def single_process() -> ClusterSpec:
    return ClusterSpec(workers=(), task_type="worker", task_index=0)


def parse_tf_config(text: str | None) -> ClusterSpec:
    """Parse TF_CONFIG; an empty or absent value means one process on its own."""
    if not text or not text.strip():
        return single_process()
    try:
        raw = json.loads(text)
        cluster = raw.get("cluster", {})
        task = raw.get("task", {})
        chief = list(cluster.get("chief", []))
        workers = list(cluster.get("worker", []))
        task_type = str(task.get("type", "worker"))
        task_index = int(task.get("index", 0))
    except (ValueError, AttributeError, TypeError) as err:
        raise ConfigError(f"TF_CONFIG is not valid cluster JSON ({err}); unset it or fix its value") from None
    if not all(isinstance(peer, str) for peer in [*chief, *workers]) or not all(
        isinstance(cluster.get(key, []), list) for key in ("chief", "worker")
    ):
        raise ConfigError(
            "TF_CONFIG cluster.worker and cluster.chief must be lists of 'host:port' strings; fix TF_CONFIG"
        )
    if task_type not in ("chief", "worker"):
        raise ConfigError(f"TF_CONFIG task type {task_type!r} is not supported; use 'worker' (or 'chief')")
    peers = chief + workers
    bound = len(chief) if task_type == "chief" else len(workers)
    if peers and not 0 <= task_index < bound:
        raise ConfigError(
            f"TF_CONFIG task index {task_index} is outside the {task_type} list of {bound}; fix TF_CONFIG"
        )
    return ClusterSpec(workers=tuple(peers), task_type=task_type, task_index=task_index, has_chief=bool(chief))


def make_tf_config(workers: list[str], index: int) -> str:
    """TF_CONFIG for worker ``index`` of a worker-only cluster (what the launcher sets)."""
    return json.dumps({"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}})
