"""`trainer status RELEASE`: a run's state in the terminal, from its workers' own metrics.

Cluster mode uses the `kubernetes` client with the user's kubeconfig (the pods hold no API token):
it finds the release's newest Job, its pods, and reads each running worker's /metrics through the
API server's pod proxy (``/api/v1/namespaces/NS/pods/POD:PORT/proxy/metrics``), so nothing needs a
port-forward. ``--metrics-url`` reads the endpoints directly instead (a local run, a
port-forward). Two reads ``--sample-seconds`` apart give images/s per worker; ``--watch`` repeats.

Only the metric names of trainer.metrics are read; nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from trainer import metrics as m
from trainer.contract import METRICS_PORT_NAME, ExitCode
from trainer.errors import ConfigError, TransientError

Samples = dict[str, list[tuple[dict[str, str], float]]]  # exposition name -> (labels, value)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    for have, number in samples.get(name, []):
        if all(have.get(k) == v for k, v in labels.items()):
            return number
    return None


@dataclass
class Snapshot:
    """What one look at a run found: each worker's metrics (index -> samples), and cluster facts."""

    workers: dict[int, Samples]
    taken: float
    job: str = ""
    job_lines: list[str] = field(default_factory=list)  # conditions, pod restarts (cluster mode)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _phase(chief: Samples) -> str:
    running = [labels["phase"] for labels, v in chief.get(m.PHASE, []) if v == 1]
    return running[0] if running else "starting (no phase yet)"


def _progress(chief: Samples) -> str:
    epoch, step, ratio = (value(chief, name) for name in (m.EPOCH, m.GLOBAL_STEP, m.PROGRESS_RATIO))
    if step is None:
        return "step: not training yet"
    total = f" of {round(step / ratio)}" if ratio else ""
    percent = f" ({ratio:.0%})" if ratio is not None else ""
    return f"epoch {int(epoch or 0)}, step {int(step)}{total}{percent}"


def _rates(before: Snapshot | None, now: Snapshot) -> str:
    if before is None:
        return "images/s: (needs two reads)"
    parts, seconds = [], max(now.taken - before.taken, 1e-9)
    for index in sorted(now.workers):
        done = value(now.workers[index], m.IMAGES_PROCESSED)
        earlier = value(before.workers.get(index, {}), m.IMAGES_PROCESSED)
        rate = (done - earlier) / seconds if done is not None and earlier is not None else None
        parts.append(f"worker {index} {rate:.1f}" if rate is not None else f"worker {index} -")
    return "images/s: " + ", ".join(parts)


def _quality(chief: Samples) -> str:
    parts = []
    for split in m.SPLITS:
        loss, accuracy = value(chief, m.LOSS, split=split), value(chief, m.ACCURACY, split=split)
        if loss is not None or accuracy is not None:
            text = f"{split} loss {loss:.4f}" if loss is not None else split
            parts.append(text + (f" acc {accuracy:.3f}" if accuracy is not None else ""))
    return "loss/accuracy: " + ("; ".join(parts) or "none yet")


def _backup(chief: Samples, now: float) -> str:
    last = value(chief, m.BACKUP_LAST_SUCCESS)
    failures = value(chief, m.BACKUP_FAILURES) or 0
    when = f"{_duration(now - last)} ago" if last else "none yet"
    return f"last backup: {when}" + (f" ({int(failures)} failed)" if failures else "")


def report(now: Snapshot, before: Snapshot | None = None) -> list[str]:
    """The lines `trainer status` prints for a snapshot (``before``: the previous one, for rates)."""
    lines = [f"job {now.job}" if now.job else "run"]
    chief = now.workers.get(0)
    if chief is None:
        lines.append("chief (worker 0): metrics not reachable (pod not running yet, or finished)")
    else:
        eta = value(chief, m.ETA_SECONDS)
        lines += [
            f"phase: {_phase(chief)}",
            _progress(chief),
            _rates(before, now),
            _quality(chief),
            f"ETA: {_duration(eta)}" if eta is not None else "ETA: not known yet",
            _backup(chief, time.time()),
            f"restarts: {int(value(chief, m.GROUP_RESTARTS) or 0)} (group restarts of the run)",
        ]
    return lines + now.job_lines


# --------------------------------------------------------------------------- sources


def read_url(url: str, timeout: float = 10.0) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TransientError(f"cannot read {url} ({reason}); is the run up and the URL its /metrics?") from None


def direct_source(urls: Sequence[str]) -> Callable[[], Snapshot]:
    """Worker i's metrics from urls[i] (the first is the chief's)."""
    if not urls:
        raise ConfigError("give RELEASE, or --metrics-url URL (repeat it for each worker, the chief first)")
    return lambda: Snapshot({i: parse(read_url(url)) for i, url in enumerate(urls)}, time.time())


def cluster_source(release: str, namespace: str | None, context: str | None) -> Callable[[], Snapshot]:
    """The release's newest Job, read through the API server with the user's kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
    except Exception as err:  # the client raises ConfigException or OSError for a missing/bad kubeconfig
        raise ConfigError(f"cannot load your kubeconfig ({err}); set KUBECONFIG or --context") from None
    namespace = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    return lambda: _cluster_snapshot(core, batch, release, namespace)


def _cluster_snapshot(core, batch, release: str, namespace: str) -> Snapshot:
    selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=worker"
    jobs = batch.list_namespaced_job(namespace, label_selector=selector).items
    if not jobs:
        raise ConfigError(f"no Job of release {release} in namespace {namespace}; check RELEASE and -n NAMESPACE")
    job = max(jobs, key=lambda j: j.metadata.creation_timestamp)
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}")
    workers: dict[int, Samples] = {}
    for pod in pods.items:
        if pod.status.phase != "Running":
            continue
        index = int(pod.metadata.annotations.get("batch.kubernetes.io/job-completion-index", "0"))
        port = next(p.container_port for p in pod.spec.containers[0].ports if p.name == METRICS_PORT_NAME)
        text = core.connect_get_namespaced_pod_proxy_with_path(f"{pod.metadata.name}:{port}", namespace, "metrics")
        workers[index] = parse(text)
    return Snapshot(workers, time.time(), job.metadata.name, _job_lines(job, pods.items))


def _job_lines(job, pods) -> list[str]:
    status = job.status
    lines = [
        f"pods: {status.active or 0} active, {status.succeeded or 0} succeeded, {status.failed or 0} failed; "
        f"container restarts {sum(c.restart_count for p in pods for c in (p.status.container_statuses or []))}"
    ]
    for cond in status.conditions or []:
        lines.append(f"condition {cond.type}={cond.status} ({cond.reason or '-'}): {cond.message or ''}".rstrip(": "))
    if job.spec.suspend:
        lines.append("suspended (spec.suspend): queued by Kueue, or stopped")
    return lines


def status_command(
    release: str | None,
    namespace: str | None,
    context: str | None,
    urls: Sequence[str],
    watch: bool,
    interval: float,
    sample_seconds: float,
) -> int:
    """Print the run's state (twice-read for rates); with ``watch`` every ``interval`` s until Ctrl-C."""
    source = cluster_source(release, namespace, context) if release else direct_source(urls)
    try:
        return _show(source, watch, interval, sample_seconds)
    except KeyboardInterrupt:  # Ctrl-C ends --watch: nothing went wrong
        return int(ExitCode.OK)


def _show(source: Callable[[], Snapshot], watch: bool, interval: float, sample_seconds: float) -> int:
    before = source()
    time.sleep(sample_seconds)
    while True:
        try:
            now = source()
        except TransientError as err:  # a restarting pod: say so and keep watching
            if not watch:
                raise
            print(f"--- {err}", flush=True)
            time.sleep(interval)
            continue
        lines = report(now, before)
        if watch:
            lines.insert(0, f"--- {datetime.datetime.now():%H:%M:%S}")
        print("\n".join(lines), flush=True)
        if not watch:
            return int(ExitCode.OK)
        before = now
        time.sleep(interval)
