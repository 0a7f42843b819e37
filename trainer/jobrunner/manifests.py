"""`helm template` output -> the `kubernetes` package's typed models (V1Job, V1ConfigMap, ...).

The YAML stream is parsed, each document routed by apiVersion/kind to its model class, and
converted by the client's own deserializer (the same code that turns API-server responses into
objects), so field names, nesting and types follow the Kubernetes OpenAPI models rather than
hand-written dictionary lookups.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainer.errors import ConfigError

#: (apiVersion, kind) -> model class name in kubernetes.client.
MODELS = {
    ("batch/v1", "Job"): "V1Job",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
}


class _Response:
    """What older ApiClient.deserialize expects: an object whose ``data`` is the JSON text."""

    def __init__(self, text: str):
        self.data = text


@functools.cache
def _api_client():
    from kubernetes.client import ApiClient

    return ApiClient()


def to_model(obj: dict[str, Any], model: str) -> Any:
    """A plain manifest dict as the typed model ``model`` (e.g. "V1Job")."""
    client = _api_client()
    text = json.dumps(obj, default=str)
    params = inspect.signature(client.deserialize).parameters
    if "response_text" in params:  # kubernetes >= 35: deserialize(text, type, content_type)
        return client.deserialize(text, model, "application/json")
    return client.deserialize(_Response(text), model)


@dataclass
class Manifests:
    job: Any  # V1Job
    config_maps: dict[str, Any] = field(default_factory=dict)  # name -> V1ConfigMap
    secrets: dict[str, Any] = field(default_factory=dict)  # name -> V1Secret
    services: dict[str, Any] = field(default_factory=dict)  # name -> V1Service
    ignored: list[str] = field(default_factory=list)  # "Kind/name" of the objects not used

    @property
    def job_name(self) -> str:
        return self.job.metadata.name

    @property
    def pod_spec(self) -> Any:  # V1PodSpec
        return self.job.spec.template.spec

    @property
    def container(self) -> Any:  # V1Container
        return self.pod_spec.containers[0]

    def headless_service(self) -> Any | None:
        """The Service named by the pod template's subdomain, when it is headless."""
        name = self.pod_spec.subdomain
        service = self.services.get(name) if name else None
        if service is None or service.spec is None or service.spec.cluster_ip != "None":
            return None
        return service


def parse_documents(text: str, source: str = "the manifests") -> list[dict[str, Any]]:
    """The documents of a YAML stream; ``source`` names it in errors (the file, or stdin)."""
    from trainer.config import UniqueKeyLoader, yaml_problem

    try:  # keys given twice are refused, as kubectl's strict decoding does
        docs = [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc]
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {yaml_problem(err)}; pass `helm template` output") from None
    out: list[dict[str, Any]] = []
    for doc in docs:
        if not isinstance(doc, dict):
            raise ConfigError("a manifest document is not a mapping; pass `helm template` output")
        if doc.get("kind") == "List":  # kubectl's wrapper
            out.extend(item for item in doc.get("items") or [] if item)
        else:
            out.append(doc)
    return out


def load_manifests(text: str, job_name: str | None = None, source: str = "the manifests") -> Manifests:
    """Read a multi-document YAML stream; pick the Job (``job_name`` when there are several)."""
    jobs, found = [], Manifests(job=None)
    for doc in parse_documents(text, source):
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = (doc.get("metadata") or {}).get("name", "")
        model = MODELS.get(key)
        if model is None:
            found.ignored.append(f"{key[1]}/{name}")
            continue
        obj = to_model(doc, model)
        if key[1] == "Job":
            jobs.append(obj)
        elif key[1] == "ConfigMap":
            found.config_maps[name] = obj
        elif key[1] == "Secret":
            found.secrets[name] = obj
        else:
            found.services[name] = obj
    if job_name is not None:
        jobs = [job for job in jobs if job.metadata.name == job_name]
    if len(jobs) != 1:
        names = ", ".join(job.metadata.name for job in jobs) or "none"
        raise ConfigError(
            f"expected exactly one batch/v1 Job in the manifests{f' named {job_name}' if job_name else ''}, "
            f"found {names}; pass `helm template` output of one release (or choose the Job by name)"
        )
    found.job = jobs[0]
    check_supported(found)
    return found


def check_supported(manifests: Manifests) -> None:
    """Refuse, with the reason, the Job features this runner does not emulate."""
    job, spec = manifests.job, manifests.job.spec
    name = job.metadata.name
    problems = []
    if (spec.completion_mode or "NonIndexed") != "Indexed":
        problems.append("completionMode is not Indexed (only Indexed Jobs are run)")
    if not spec.completions:
        problems.append("completions is not set")
    if spec.backoff_limit_per_index is not None or spec.max_failed_indexes is not None:
        problems.append("backoffLimitPerIndex/maxFailedIndexes are not emulated")
    if spec.success_policy is not None:
        problems.append("successPolicy is not emulated")
    pod = spec.template.spec
    if pod.restart_policy not in ("Never", None) and spec.pod_failure_policy is not None:
        problems.append("podFailurePolicy needs restartPolicy: Never")
    if pod.restart_policy == "OnFailure":
        problems.append("restartPolicy OnFailure (in-place container restarts) is not emulated")
    if len(pod.containers) != 1 or pod.init_containers:
        problems.append("pods must have exactly one container and no init containers")
    if problems:
        raise ConfigError(f"Job {name}: " + "; ".join(problems))
