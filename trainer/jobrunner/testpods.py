"""`trainer job test`: run the chart's `helm test` pods (annotation helm.sh/hook: test) locally.

Each test pod runs as a one-pod Indexed Job of the runner (restartPolicy Never, no retry), with
the ConfigMaps and Secrets of the same manifests, so it gets the mounts and environment it would
get in the cluster. On a cluster the headless Service publishes the workers' names from the
moment their pods exist; here the test pod's private /etc/hosts names the Job's workers at the
addresses the runner gives them (pod networking only), so `trainer doctor` resolves them as it
would beside a running Job.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from trainer.errors import ConfigError
from trainer.jobrunner import podspec
from trainer.jobrunner.manifests import Manifests, load_manifests, parse_documents, to_model
from trainer.jobrunner.network import pod_address

HOOK_ANNOTATION = "helm.sh/hook"


def hook_test_pods(text: str, source: str) -> list[dict[str, Any]]:
    """The Pod documents that are `helm test` hooks."""
    pods = []
    for doc in parse_documents(text, source):
        hooks = ((doc.get("metadata") or {}).get("annotations") or {}).get(HOOK_ANNOTATION, "")
        if doc.get("kind") == "Pod" and "test" in [h.strip() for h in hooks.split(",")]:
            pods.append(doc)
    if not pods:
        raise ConfigError(f"{source} has no Pod annotated {HOOK_ANNOTATION}: test; pass `helm template` output")
    return pods


def as_job(pod: dict[str, Any], workers: Manifests, namespace: str) -> Manifests:
    """A one-pod Indexed Job running ``pod``, naming the workers of ``workers`` in its hosts file."""
    spec = copy.deepcopy(pod["spec"])
    if spec.get("restartPolicy", "Always") != "Never":
        raise ConfigError(f"test pod {pod['metadata']['name']}: restartPolicy must be Never (a test runs once)")
    worker_job, subdomain = workers.job_name, workers.pod_spec.subdomain
    if subdomain and workers.headless_service() is not None:
        spec.setdefault("hostAliases", []).extend(
            {"ip": pod_address(i), "hostnames": podspec.peer_names(worker_job, i, subdomain, namespace)}
            for i in range(int(workers.job.spec.completions))
        )
    metadata = pod["metadata"]
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": metadata["name"], "namespace": namespace},
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 0,
            "template": {"metadata": {k: metadata.get(k) for k in ("labels", "annotations")}, "spec": spec},
        },
    }
    return Manifests(job=to_model(job, "V1Job"), config_maps=workers.config_maps, secrets=workers.secrets)


def run_test_file(path: str, timeout: float | None, namespace: str | None, network: str, volumes) -> int:
    """`trainer job test`: run every test pod of a manifests file; the first failing pod's exit code."""
    from trainer.jobrunner.runner import JobRunner, read_manifests_text, volume_map

    text, source = read_manifests_text(path)
    workers = load_manifests(text, source=source)
    namespace = namespace or workers.job.metadata.namespace or "default"
    code = 0
    for pod in hook_test_pods(text, source):
        manifests = as_job(pod, workers, namespace)
        with JobRunner(manifests, namespace=namespace, network=network, volume_dirs=volume_map(volumes)) as runner:
            status = runner.run(timeout)
            final = status.conditions[-1]
            verdict = "passed" if runner.succeeded else f"failed ({final.reason}: {final.message})"
            print(f"test pod {runner.name}: {verdict}", flush=True)
            code = code or runner.exit_code
    sys.stdout.flush()
    return code
