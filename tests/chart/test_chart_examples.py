"""docs/examples/gke-l4.yaml, the values a GKE team types for a first run (issue 18's acceptance):
it renders with the defaults otherwise, every object is valid Kubernetes, and the pods carry what
each value asked for. tests/test_jobrunner.py runs the same file through `trainer job run`."""

from __future__ import annotations

import pytest
import yaml
from chart_helpers import ROOT, helm_cmd, kubernetes_errors, one, pod_specs, render, restricted_violations

GKE_L4 = ROOT / "docs" / "examples" / "gke-l4.yaml"


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(GKE_L4.read_text())


@pytest.fixture(scope="module")
def docs(values) -> list[dict]:
    return render(values)


def test_gke_values_render_into_valid_restricted_kubernetes(values, docs, k8s_schemas):
    lint = helm_cmd("lint", values)

    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not kubernetes_errors(docs, k8s_schemas), "\n".join(kubernetes_errors(docs, k8s_schemas))
    for spec in pod_specs(docs):
        assert restricted_violations(spec) == []


def test_gke_values_reach_the_pods(docs):
    job = one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]

    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu"]  # the user's, not repeated
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and "suspend" not in job["spec"]
    account = one(docs, "ServiceAccount")["metadata"]["annotations"]
    assert account["iam.gke.io/gcp-service-account"] == "vgg-trainer@my-project.iam.gserviceaccount.com"


def test_gke_values_monitor_with_kube_prometheus_stack(docs):
    assert one(docs, "PodMonitor")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert len(dashboards) == 1 and dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_gke_values_stage_gcs_shards_within_the_scratch_volume(docs):
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    config = yaml.safe_load(config_map["data"]["config.yaml"])

    assert config["data"]["dataset"] == "gs://my-bucket/datasets/flowers"
    assert config["output"]["dir"] == "gs://my-bucket/runs/flowers-l4"
    assert config["data"]["staging"] == {"enabled": True, "budget_gb": 19.32}  # 90% of scratch's 20Gi
