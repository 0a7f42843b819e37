"""Helpers of the chart, manifest and image tests: real helm and kubectl, rendering, schemas.

helm and kubectl come from .tools/bin (scripts/tools.sh fetches them), else from PATH. These
tests never skip: without the binaries they fail and say how to get them.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "vgg-trainer"
TOOLS_BIN = ROOT / ".tools" / "bin"
#: Kubernetes minor versions every rendered object is validated against (kubernetes-validate ships them).
K8S_VERSIONS = ("1.31", "1.33", "1.35")
#: Values every render needs (the chart requires a dataset and an output).
REQUIRED = {"dataset": "gs://ml-data/datasets/flowers", "output": "gs://ml-runs/runs/flowers"}
RELEASE = "flowers"
#: `helm template` flags of a cluster that serves the Prometheus Operator's CRDs.
OPERATOR = ("--api-versions", "monitoring.coreos.com/v1")
NAMESPACE = "ml"


def find_tool(name: str) -> str:
    local = TOOLS_BIN / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in {TOOLS_BIN} or on PATH; run scripts/tools.sh (fetches helm and kubectl)")
    return found


@functools.cache
def helm() -> str:
    return find_tool("helm")


@functools.cache
def kubectl() -> str:
    return find_tool("kubectl")


def run(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of values dicts, later layers winning (as helm merges -f files)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


def values_file(values: dict[str, Any]) -> str:
    fd, path = tempfile.mkstemp(prefix="values-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)  # JSON is YAML
    return path


def helm_cmd(command: str, values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE) -> tuple:
    """(subprocess result) of `helm <command>` on the chart with ``values`` as a values file."""
    path = values_file(values)
    try:
        if command == "lint":
            args = [helm(), "lint", "--strict", str(CHART), "-f", path, "--namespace", namespace]
        else:
            # A cluster with the Prometheus Operator (the chart renders its objects only then).
            args = [helm(), "template", release, str(CHART), "-f", path, "--namespace", namespace, *OPERATOR]
        return run(args, check=False)
    finally:
        os.unlink(path)


@functools.cache
def _render_cached(key: str, release: str, namespace: str) -> tuple[str, ...]:
    proc = helm_cmd("template", json.loads(key), release, namespace)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return (proc.stdout,)


def render(values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """The documents `helm template` renders for REQUIRED + ``values`` (cached; do not mutate)."""
    key = json.dumps(merge(REQUIRED, values or {}), sort_keys=True)
    (text,) = _render_cached(key, release, namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render_error(values: dict[str, Any], with_required: bool = True) -> str:
    """helm's error output for values the chart must refuse."""
    proc = helm_cmd("template", merge(REQUIRED, values) if with_required else values)
    assert proc.returncode != 0, f"helm template accepted {values}"
    return proc.stderr


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def pod_specs(docs: list[dict]) -> list[dict]:
    """Every pod spec in the documents (Job templates; the chart has no other workloads)."""
    specs = []
    for doc in docs:
        if doc["kind"] in ("Job",):
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "Pod":
            specs.append(doc["spec"])
        elif doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "CronJob"):
            raise AssertionError(f"unexpected workload {doc['kind']}: extend pod_specs")
    return specs


# --------------------------------------------------------------------------- Kubernetes schemas


class KubernetesSchemas:
    """kubernetes-validate's strict OpenAPI-derived schemas, validators cached per kind and version.

    kubernetes_validate.validate() reloads the 1.5 MB definitions for every document; this keeps
    one registry per Kubernetes version so hundreds of documents validate in about a second.
    """

    def __init__(self) -> None:
        import kubernetes_validate.utils as kv

        self._kv = kv
        self._registries: dict[str, Any] = {}
        self._validators: dict[tuple[str, str, str], Any] = {}

    def _schema_dir(self, version: str) -> str:
        available = [v for v in self._kv.all_versions() if self._kv.major_minor(v) == version]
        assert available, f"kubernetes-validate {self._kv.__version__} has no schemas for {version}"
        return f"kubernetes-json-schema/v{available[-1]}-local-strict"

    def validator(self, doc: dict, version: str):
        import re

        from referencing import Registry, Resource

        api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
        key = (version, doc["kind"], api)
        if key not in self._validators:
            schema_dir = self._schema_dir(version)
            if version not in self._registries:
                defs = self._kv.schema_contents(f"{schema_dir}/_definitions.json", version)
                self._registries[version] = Resource.from_contents(defs) @ Registry()
            schema = self._kv.schema_contents(f"{schema_dir}/{doc['kind'].lower()}-{api}.json", version)
            registry = Resource.from_contents(schema) @ self._registries[version]
            self._validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, doc: dict, version: str) -> list[str]:
        return [
            f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {'.'.join(map(str, e.path))}: {e.message}"
            for e in self.validator(doc, version).iter_errors(doc)
        ]


def kubernetes_errors(docs: list[dict], schemas: KubernetesSchemas) -> list[str]:
    """Strict schema errors of every document for every K8S_VERSIONS (Prometheus Operator CRDs,
    which kubernetes-validate has no schemas for, are checked structurally by test_monitoring_*)."""
    return [
        error
        for doc in docs
        if not doc["apiVersion"].startswith("monitoring.coreos.com/")
        for version in K8S_VERSIONS
        for error in schemas.errors(doc, version)
    ]


# --------------------------------------------------------------------------- Pod Security "restricted"

#: Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(spec: dict) -> list[str]:
    """Violations of Pod Security Standard "restricted" (kubernetes.io/docs/concepts/security/
    pod-security-standards), plus this chart's own rule: a read-only root filesystem."""
    problems = []
    pod_sc = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field) is True:
            problems.append(f"pod: {field}")
    for volume in spec.get("volumes", []):
        types = set(volume) - {"name"}
        if not types <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: type {types - RESTRICTED_VOLUME_TYPES}")
    if pod_sc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("pod: seccompProfile must be RuntimeDefault or Localhost")
    if pod_sc.get("runAsUser") == 0 or pod_sc.get("runAsGroup") == 0:
        problems.append("pod: runs as root")
    for sysctl in pod_sc.get("sysctls", []):
        problems.append(f"pod: sysctl {sysctl['name']}")
    containers = spec.get("containers", []) + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext", {})
        name = f"container {c['name']}"
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (0, None):
            problems.append(f"{name}: no non-zero runAsUser")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile {seccomp}")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            problems.append(f"{name}: AppArmor unconfined")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem must be true")
    return problems


def normalized(doc: Any) -> Any:
    """``doc`` with lists of named items sorted by name (kustomize reorders env, volumes, ...)."""
    if isinstance(doc, dict):
        return {k: normalized(v) for k, v in doc.items()}
    if isinstance(doc, list):
        items = [normalized(v) for v in doc]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            items.sort(key=lambda i: str(i["name"]))
        return items
    return doc
