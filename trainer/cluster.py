"""Who am I in the cluster? Pure functions over TF_CONFIG (no TensorFlow import).

tf.distribute describes a multi-worker cluster with the TF_CONFIG environment variable:
``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": 0}}``.
Worker 0 is the chief unless the cluster names an explicit ``chief`` task.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from trainer.contract import WORKER_PORT, Env
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


def tf_config_from_env(env: Mapping[str, str]) -> str | None:
    """TF_CONFIG for this process: the explicit variable, else derived from the Indexed Job.

    The Helm chart runs one pod per worker in an Indexed Job whose pods are reachable at
    ``<job>-<index>.<service>.<namespace>.svc`` (the headless Service is their subdomain);
    it sets TRAINER_NUM_WORKERS, TRAINER_JOB_NAME, TRAINER_SERVICE_NAME, TRAINER_NAMESPACE
    and TRAINER_WORKER_PORT, and Kubernetes sets JOB_COMPLETION_INDEX. One worker needs no
    TF_CONFIG (and so never uses MultiWorkerMirroredStrategy).
    """
    explicit = env.get(Env.TF_CONFIG.value, "").strip()
    if explicit:
        return explicit
    workers = _int_env(env, Env.NUM_WORKERS, default=1)
    if workers <= 1:
        return None
    missing = [
        v.value for v in (Env.JOB_NAME, Env.SERVICE_NAME, Env.NAMESPACE, Env.COMPLETION_INDEX) if not env.get(v.value)
    ]
    if missing:
        raise ConfigError(
            f"{Env.NUM_WORKERS.value}={workers} but {', '.join(missing)} not set; "
            "run through the Helm chart's Job, or set TF_CONFIG"
        )
    index = _int_env(env, Env.COMPLETION_INDEX, default=0)
    if not 0 <= index < workers:
        raise ConfigError(
            f"{Env.COMPLETION_INDEX.value}={index} is outside 0..{workers - 1}; fix the Job's parallelism"
        )
    job, service, namespace = (env[v.value] for v in (Env.JOB_NAME, Env.SERVICE_NAME, Env.NAMESPACE))
    port = _int_env(env, Env.WORKER_PORT, default=WORKER_PORT)
    peers = [f"{job}-{i}.{service}.{namespace}.svc:{port}" for i in range(workers)]
    return make_tf_config(peers, index)


def _int_env(env: Mapping[str, str], name: Env, default: int) -> int:
    text = env.get(name.value, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name.value}={text!r} is not a whole number; fix the pod's environment") from None
