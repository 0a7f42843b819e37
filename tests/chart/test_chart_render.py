"""helm lint and helm template over a matrix of values: every object valid for three Kubernetes
versions, every pod "restricted", and the Job running the trainer exactly as it expects."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from chart_helpers import (
    CHART,
    K8S_VERSIONS,
    NAMESPACE,
    RELEASE,
    REQUIRED,
    helm,
    helm_cmd,
    kinds,
    merge,
    one,
    pod_specs,
    render,
    render_error,
    restricted_violations,
    run,
    values_file,
)

from trainer import config as config_lib
from trainer.contract import (
    BAKED_WEIGHTS_PATH,
    CONFIG_FILE_NAME,
    CONFIG_MOUNT_DIR,
    CONTAINER_GID,
    CONTAINER_NAME,
    CONTAINER_UID,
    DEFAULT_LEASE_SECONDS,
    ENTRYPOINT,
    HEALTH_PATH,
    METRIC_PREFIX,
    METRICS_PORT,
    METRICS_PORT_NAME,
    NON_RETRIABLE_EXIT_CODES,
    SCRATCH_MOUNT_DIR,
    WORKER_PORT,
    WORKER_PORT_NAME,
    Env,
    ExitCode,
)

MONITORING_ALL = {
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": True},
    }
}
WORKLOAD_IDENTITY = {
    "workloadIdentity": {"enabled": True, "gcpServiceAccount": "trainer@my-project.iam.gserviceaccount.com"}
}
KUEUE = {"kueue": {"enabled": True, "queueName": "team-a", "priorityClassName": "batch-low"}}
EGRESS = {"networkPolicy": {"egress": {"enabled": True}}}
PUSHGATEWAY_SECRET = {"monitoring": {"pushgateway": {"existingSecret": "pushgateway-auth", "key": "push-url"}}}

#: The values matrix: name -> values on top of REQUIRED.
SCENARIOS: dict[str, dict] = {
    "defaults-1x1gpu": {},
    "single-node-1x8gpu": {"workers": 1, "gpusPerWorker": 8, "resources": {"requests": {"cpu": "48"}}},
    "multi-worker-4x1gpu": {"workers": 4, "gpusPerWorker": 1},
    "cpu-only-2x0": {"workers": 2, "gpusPerWorker": 0},
    "monitoring-pod": MONITORING_ALL,
    "monitoring-service": {
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "interval": "15s"},
            "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "folder": "ML"},
        }
    },
    "monitoring-off": {"monitoring": {"podMonitor": {"enabled": False}}},
    "metrics-port-9100": merge(MONITORING_ALL, {"trainer": {"monitoring": {"port": 9100, "address": "::"}}}),
    "workload-identity": WORKLOAD_IDENTITY,
    "key-file-secret": {"credentials": {"existingSecret": "gcs-key", "key": "sa.json"}},
    "pushgateway-secret": PUSHGATEWAY_SECRET,
    "network-policy-off": {"networkPolicy": {"enabled": False}},
    "egress-policy": merge(WORKLOAD_IDENTITY, EGRESS, {"workers": 2, "gpusPerWorker": 1}),
    "kueue": KUEUE,
    "kueue-topology": merge(KUEUE, {"kueue": {"topology": {"required": "cloud.google.com/gce-topology-block"}}}),
    "everything": merge(
        MONITORING_ALL,
        WORKLOAD_IDENTITY,
        KUEUE,
        {
            "workers": 8,
            "gpusPerWorker": 4,
            "workerPlacement": "pack",
            "image": {"repository": "europe-docker.pkg.dev/p/ml/vgg-trainer", "digest": "sha256:" + "a" * 64},
            "imagePullSecrets": [{"name": "regcred"}],
            "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "schedulerName": "volcano",
            "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
            "extraVolumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "flowers", "readOnly": True}}],
            "extraVolumeMounts": [{"name": "data", "mountPath": "/data", "readOnly": True}],
            "podLabels": {"team": "vision"},
            "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
            "job": {"activeDeadlineSeconds": 86400, "ttlSecondsAfterFinished": None, "backoffLimit": 20},
            "trainer": {
                "phases": {"fine_tuning": {"epochs": 3, "unfreeze_blocks": ["block4", "block5"]}},
                "train": {"batch_size_per_replica": 64},
                "runtime": {"mixed_precision": "on", "jit_compile": True},
            },
            "serviceAccount": {"annotations": {"team": "vision"}},
        },
    ),
}
SCENARIO_IDS = list(SCENARIOS)


def values_of(name: str) -> dict:
    return merge(REQUIRED, SCENARIOS[name])


def metrics_port_of(values: dict) -> int:
    """The port the trainer's endpoint listens on with these values (trainer.monitoring.port)."""
    return values.get("trainer", {}).get("monitoring", {}).get("port", METRICS_PORT)


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Job")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(docs)["env"]}


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_helm_lint_strict_passes(scenario):
    proc = helm_cmd("lint", values_of(scenario))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_every_rendered_object_is_valid_kubernetes(scenario, k8s_schemas):
    docs = render(SCENARIOS[scenario])
    errors = []
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: checked structurally in test_monitoring_*
        for version in K8S_VERSIONS:
            errors += k8s_schemas.errors(doc, version)

    assert not errors, "\n".join(errors)
    crds = {d["kind"] for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")}
    assert crds <= {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_every_pod_is_pod_security_restricted(scenario):
    specs = pod_specs(render(SCENARIOS[scenario]))

    assert specs
    for spec in specs:
        assert restricted_violations(spec) == []
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsUser"] == CONTAINER_UID
        assert spec["securityContext"]["runAsGroup"] == CONTAINER_GID
        assert spec["securityContext"]["fsGroup"] == CONTAINER_GID


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_read_only_root_filesystem_with_writable_empty_dirs(scenario):
    docs = render(SCENARIOS[scenario])
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container(docs)["volumeMounts"]}

    assert container(docs)["securityContext"]["readOnlyRootFilesystem"] is True
    for path in ("/tmp", SCRATCH_MOUNT_DIR, "/dev/shm"):
        volume = volumes[mounts[path]["name"]]
        assert "emptyDir" in volume and volume["emptyDir"]["sizeLimit"], path
        assert not mounts[path].get("readOnly")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_job_runs_the_trainer_as_the_trainer_expects(scenario, tmp_path):
    values = values_of(scenario)
    docs = render(SCENARIOS[scenario])
    job = one(docs, "Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    c = container(docs)
    env = env_of(docs)
    config_path = f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}"

    # The command the image's entrypoint runs, with the mounted configuration.
    assert c["name"] == CONTAINER_NAME
    assert c["command"] == [ENTRYPOINT]
    assert c["args"] == ["train", "--config", config_path]
    assert env[Env.CONFIG_FILE.value]["value"] == config_path
    assert env[Env.LEGACY_KERAS.value]["value"] == "1"
    # The Indexed Job the trainer derives its cluster from.
    workers = values.get("workers", 1)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == workers
    assert env[Env.NUM_WORKERS.value]["value"] == str(workers)
    assert env[Env.JOB_NAME.value]["value"] == job["metadata"]["name"]
    service = one(docs, "Service")
    assert env[Env.SERVICE_NAME.value]["value"] == service["metadata"]["name"] == pod["subdomain"]
    assert env[Env.NAMESPACE.value]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env[Env.WORKER_PORT.value]["value"] == str(WORKER_PORT)
    assert env[Env.SCRATCH_DIR.value]["value"] == SCRATCH_MOUNT_DIR
    assert env[Env.COMPLETION_INDEX.value]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert Env.TF_CONFIG.value not in env  # the trainer derives it; an explicit one would win
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        WORKER_PORT_NAME: WORKER_PORT,
        METRICS_PORT_NAME: metrics_port_of(values),
    }
    # The ConfigMap mounted read-only where --config points, holding a configuration the trainer accepts.
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == CONFIG_MOUNT_DIR]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    configmap = configmaps[volume["configMap"]["name"]]
    raw = yaml.safe_load(configmap["data"][CONFIG_FILE_NAME])
    cfg = config_lib.config_from_dict(raw)  # raises ConfigError (exit 64 in a pod) when invalid
    assert cfg.data.dataset == values["dataset"]
    assert cfg.output.dir == values["output"]
    for section, settings in values.get("trainer", {}).items():
        for key, value in settings.items():
            assert raw[section][key] == value
    # The file itself through the trainer's loader, as `trainer train --config` reads it in the pod.
    mounted = tmp_path / CONFIG_FILE_NAME
    mounted.write_text(configmap["data"][CONFIG_FILE_NAME])
    assert config_lib.load_config(str(mounted)) == cfg


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_pods_find_each_other_through_the_headless_service(scenario):
    docs = render(SCENARIOS[scenario])
    job = one(docs, "Job")
    service = one(docs, "Service")
    pod_labels = dict(job["spec"]["template"]["metadata"]["labels"])
    pod_labels["batch.kubernetes.io/job-name"] = job["metadata"]["name"]  # added by the Job controller

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        WORKER_PORT_NAME: WORKER_PORT,
        METRICS_PORT_NAME: metrics_port_of(values_of(scenario)),
    }
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]


# --------------------------------------------------------------------------- Job behaviour


def test_liveness_probe_asks_the_metrics_port_only_when_the_endpoint_runs():
    def probe(values):
        return one(render(values), "Job")["spec"]["template"]["spec"]["containers"][0].get("livenessProbe")

    default = probe({})
    tuned = probe({"job": {"livenessProbe": {"periodSeconds": 5, "failureThreshold": 3}}})

    assert default["httpGet"] == {"path": HEALTH_PATH, "port": METRICS_PORT_NAME}
    assert default["periodSeconds"] * default["failureThreshold"] == 120  # a frozen trainer lives 2 min
    assert tuned["periodSeconds"] == 5 and tuned["failureThreshold"] == 3 and tuned["timeoutSeconds"] == 10
    assert probe({"job": {"livenessProbe": {"enabled": False}}}) is None
    assert probe({"trainer": {"monitoring": {"enabled": False}}}) is None  # no endpoint, no probe


def test_pod_failure_policy_follows_the_trainers_exit_codes():
    job = one(render(), "Job")
    spec = job["spec"]
    rules = spec["podFailurePolicy"]["rules"]

    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods of one index (TF rejects duplicates)
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "Ignore"
    preempted = {"containerName": CONTAINER_NAME, "operator": "In", "values": [ExitCode.PREEMPTED]}
    assert rules[1]["onExitCodes"] == preempted
    assert rules[2]["action"] == "FailJob"
    assert rules[2]["onExitCodes"]["containerName"] == CONTAINER_NAME
    assert rules[2]["onExitCodes"]["operator"] == "In"
    assert rules[2]["onExitCodes"]["values"] == sorted(int(c) for c in NON_RETRIABLE_EXIT_CODES)
    assert len(rules) == 3  # everything else (INTERNAL, TRANSIENT, OOM) counts toward backoffLimit
    mentioned = {v for r in rules for v in r.get("onExitCodes", {}).get("values", [])}
    assert ExitCode.INTERNAL not in mentioned and ExitCode.TRANSIENT not in mentioned


def test_job_limits_and_grace_period_come_from_values():
    default = one(render({"workers": 4}), "Job")["spec"]
    custom = one(
        render(
            {
                "job": {
                    "backoffLimit": 7,
                    "activeDeadlineSeconds": 3600,
                    "ttlSecondsAfterFinished": None,
                    "terminationGracePeriodSeconds": 600,
                }
            }
        ),
        "Job",
    )["spec"]

    assert default["backoffLimit"] == 12  # 3 per worker
    assert "activeDeadlineSeconds" not in default
    assert default["ttlSecondsAfterFinished"] == 604800
    assert default["template"]["spec"]["terminationGracePeriodSeconds"] == 300
    assert custom["backoffLimit"] == 7
    assert custom["activeDeadlineSeconds"] == 3600
    assert "ttlSecondsAfterFinished" not in custom
    assert custom["template"]["spec"]["terminationGracePeriodSeconds"] == 600


def test_default_configuration_is_the_trainers_with_the_baked_weights():
    docs = render()
    raw = yaml.safe_load(one(docs, "ConfigMap")["data"][CONFIG_FILE_NAME])
    cfg = config_lib.config_from_dict(raw)
    expected = config_lib.config_from_dict(
        {
            "data": {"dataset": REQUIRED["dataset"]},
            # The Job of a `helm upgrade` waits for the old Job's pods to stop (trainer.train.lease).
            "output": {"dir": REQUIRED["output"], "lease_wait_seconds": 300 + DEFAULT_LEASE_SECONDS},
            "model": {"weights": BAKED_WEIGHTS_PATH},
        }
    )

    assert cfg == expected


def test_yaml_on_off_and_small_floats_survive_helm():
    raw_values = {
        "trainer": {
            "runtime": {"mixed_precision": "off"},
            "phases": {"fine_tuning": {"optimizer": {"learning_rate": 1e-7}}},
            "data": {"shuffle_buffer": 1000000},
        }
    }
    raw = yaml.safe_load(one(render(raw_values), "ConfigMap")["data"][CONFIG_FILE_NAME])
    cfg = config_lib.config_from_dict(raw)

    assert cfg.runtime.mixed_precision == "off"
    assert cfg.phases["fine_tuning"].optimizer.learning_rate == pytest.approx(1e-7)
    assert cfg.data.shuffle_buffer == 1000000


# --------------------------------------------------------------------------- GPUs and placement


def test_gpus_per_worker_become_resources_and_a_toleration():
    eight = render(SCENARIOS["single-node-1x8gpu"])
    cpu = render(SCENARIOS["cpu-only-2x0"])
    spec8 = one(eight, "Job")["spec"]["template"]["spec"]

    assert container(eight)["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container(eight)["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container(eight)["resources"]["requests"]["cpu"] == "48"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec8["tolerations"]
    assert "CUDA_VISIBLE_DEVICES" not in env_of(eight)
    assert "affinity" not in spec8  # one worker: nothing to spread
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]
    assert "tolerations" not in one(cpu, "Job")["spec"]["template"]["spec"]
    assert env_of(cpu)["CUDA_VISIBLE_DEVICES"]["value"] == ""


@pytest.mark.parametrize(
    "toleration",
    [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
    ],
)
def test_the_gpu_toleration_is_not_repeated_when_the_user_gives_one(toleration):
    spot = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    spec = one(render({"tolerations": [toleration, spot]}), "Job")["spec"]["template"]["spec"]

    assert spec["tolerations"] == [toleration, spot]


@pytest.mark.parametrize(
    ("placement", "kind"), [("spread", "podAntiAffinity"), ("pack", "podAffinity"), ("none", None)]
)
def test_worker_placement(placement, kind):
    job = one(render({"workers": 3, "workerPlacement": placement}), "Job")
    affinity = job["spec"]["template"]["spec"].get("affinity")

    if kind is None:
        assert affinity is None
        return
    (term,) = affinity[kind]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"]["batch.kubernetes.io/job-name"]
        == (job["metadata"]["name"])
    )


def test_explicit_affinity_wins():
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a100"]}]}]
            }
        }
    }
    spec = one(render({"workers": 3, "affinity": affinity}), "Job")["spec"]["template"]["spec"]

    assert spec["affinity"] == affinity


def test_scheduling_values_reach_the_pod():
    docs = render(SCENARIOS["everything"])
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    meta = one(docs, "Job")["spec"]["template"]["metadata"]

    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["priorityClassName"] == "training"
    assert spec["schedulerName"] == "volcano"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert container(docs)["image"] == "europe-docker.pkg.dev/p/ml/vgg-trainer@sha256:" + "a" * 64
    assert meta["labels"]["team"] == "vision"
    assert meta["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert env_of(docs)["NCCL_DEBUG"]["value"] == "WARN"
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container(docs)["volumeMounts"]


def test_image_registry_goes_in_front_of_the_repository():
    docs = render({"image": {"registry": "europe-docker.pkg.dev/p/ml/", "digest": "sha256:" + "b" * 64}})

    assert container(docs)["image"] == "europe-docker.pkg.dev/p/ml/vgg-trainer@sha256:" + "b" * 64
    assert one(docs, "Pod")["spec"]["containers"][0]["image"] == container(docs)["image"]  # the helm test pod too


def test_common_labels_reach_every_object_and_the_worker_pods():
    docs = render(merge(MONITORING_ALL, {"commonLabels": {"team": "vision", "cost-center": "ml"}}))

    for doc in docs:
        assert doc["metadata"]["labels"]["team"] == "vision", doc["kind"]
    assert one(docs, "Job")["spec"]["template"]["metadata"]["labels"]["cost-center"] == "ml"
    assert "team" not in one(docs, "Service")["spec"]["selector"]  # selectors stay the chart's


def test_image_defaults_to_the_app_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert container(render())["image"] == f"vgg-trainer:{chart['appVersion']}"
    assert container(render({"image": {"tag": "dev-1"}}))["image"] == "vgg-trainer:dev-1"


# --------------------------------------------------------------------------- Kueue, identity, network


def test_kueue_queues_the_job_and_leaves_suspend_to_kueue():
    """Kueue's webhook suspends a queued Job; Helm 4's server-side apply must not own the field."""
    job = one(render(KUEUE), "Job")
    plain = one(render(), "Job")

    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch-low"
    assert "suspend" not in job["spec"]
    assert plain["spec"]["suspend"] is False
    assert one(render({"job": {"suspend": True}}), "Job")["spec"]["suspend"] is True
    assert not any(k.startswith("kueue.x-k8s.io/") for k in plain["metadata"]["labels"])


@pytest.mark.parametrize("level", ["required", "preferred"])
def test_kueue_topology_aware_scheduling_annotates_the_pod_template(level):
    block = "cloud.google.com/gce-topology-block"
    job = one(render(merge(KUEUE, {"kueue": {"topology": {level: block}}})), "Job")
    annotations = job["spec"]["template"]["metadata"]["annotations"]

    assert annotations[f"kueue.x-k8s.io/podset-{level}-topology"] == block
    assert [k for k in annotations if k.startswith("kueue.x-k8s.io/")] == [f"kueue.x-k8s.io/podset-{level}-topology"]
    assert not any(
        k.startswith("kueue.x-k8s.io/")
        for k in one(render(KUEUE), "Job")["spec"]["template"]["metadata"]["annotations"]
    )


def test_notes_under_kueue_rescale_without_suspending():
    path = values_file(merge(REQUIRED, KUEUE))
    try:
        proc = run([helm(), "install", "flowers", str(CHART), "-f", path, "-n", NAMESPACE, "--dry-run=client"])
    finally:
        os.unlink(path)
    notes = proc.stdout.split("NOTES:", 1)[1]

    assert "--reuse-values --set workers=N" in notes and "job.suspend" not in notes
    assert "until Kueue admits it (queue team-a)" in notes and "get workloads" in notes


def test_workload_identity_annotates_the_service_account():
    on = render(WORKLOAD_IDENTITY)
    off = render()
    sa = one(on, "ServiceAccount")

    assert sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == (
        "trainer@my-project.iam.gserviceaccount.com"
    )
    assert sa["automountServiceAccountToken"] is False
    assert one(on, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "annotations" not in one(off, "ServiceAccount")["metadata"]


def test_existing_service_account_is_used_without_creating_one():
    docs = render({"serviceAccount": {"create": False, "name": "ml-runner"}})

    assert "ServiceAccount" not in kinds(docs)
    assert one(docs, "Job")["spec"]["template"]["spec"]["serviceAccountName"] == "ml-runner"


def test_the_metrics_port_follows_trainer_monitoring_port_everywhere():
    """Probe, container port, Service, NetworkPolicy, monitors and NOTES all use the port the trainer listens on."""
    port = 9100
    moved = {"trainer": {"monitoring": {"port": port}}}
    values = merge(MONITORING_ALL, moved)
    docs = render(values)
    c = container(docs)
    service = one(docs, "Service")
    _, metrics_ingress = one(docs, "NetworkPolicy")["spec"]["ingress"]
    (pod_endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    service_monitor = one(render(merge(SCENARIOS["monitoring-service"], moved)), "ServiceMonitor")
    (service_endpoint,) = service_monitor["spec"]["endpoints"]
    (config_text,) = [d["data"][CONFIG_FILE_NAME] for d in docs if CONFIG_FILE_NAME in d.get("data", {})]
    raw = yaml.safe_load(config_text)
    path = values_file(merge(REQUIRED, values))
    try:
        notes = run([helm(), "install", "flowers", str(CHART), "-f", path, "-n", NAMESPACE, "--dry-run=client"])
    finally:
        os.unlink(path)

    assert config_lib.config_from_dict(raw).monitoring.port == port  # where the trainer listens
    assert {p["name"]: p["containerPort"] for p in c["ports"]}[METRICS_PORT_NAME] == port
    assert c["livenessProbe"]["httpGet"]["port"] == METRICS_PORT_NAME  # the named port: 9100
    assert metrics_ingress["ports"] == [{"port": port, "protocol": "TCP"}]
    (service_port,) = [p for p in service["spec"]["ports"] if p["name"] == METRICS_PORT_NAME]
    assert (service_port["port"], service_port["targetPort"]) == (port, METRICS_PORT_NAME)
    assert pod_endpoint["port"] == service_endpoint["port"] == METRICS_PORT_NAME
    assert f"{port}/metrics" in notes.stdout.split("NOTES:", 1)[1]
    numbers = re.findall(r"\b(?:port|containerPort|targetPort): (\d+)", yaml.safe_dump_all(docs))
    assert str(METRICS_PORT) not in numbers, "something still uses the default metrics port"


def test_key_file_is_mounted_from_the_secret_never_put_in_env():
    docs = render(SCENARIOS["key-file-secret"])
    spec = one(docs, "Job")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == volume["name"]]

    assert volume["secret"]["secretName"] == "gcs-key"
    assert volume["secret"]["items"] == [{"key": "sa.json", "path": "sa.json"}]
    assert mount["readOnly"] is True
    assert env_of(docs)["GOOGLE_APPLICATION_CREDENTIALS"]["value"] == f"{mount['mountPath']}/sa.json"
    for doc in docs:
        assert "secretKeyRef" not in json.dumps(doc) and "secretRef" not in json.dumps(doc)


def test_the_pushgateway_url_comes_from_the_secret_never_from_the_config_map():
    docs = render(PUSHGATEWAY_SECRET)
    (config_text,) = [d["data"][CONFIG_FILE_NAME] for d in docs if CONFIG_FILE_NAME in d.get("data", {})]

    assert env_of(docs)[Env.PUSHGATEWAY_URL.value] == {
        "name": Env.PUSHGATEWAY_URL.value,
        "valueFrom": {"secretKeyRef": {"name": "pushgateway-auth", "key": "push-url"}},
    }
    assert config_lib.config_from_dict(yaml.safe_load(config_text)).monitoring.pushgateway_url == ""
    assert "pushgateway_url" not in config_text
    assert Env.PUSHGATEWAY_URL.value not in env_of(render())  # only with the Secret


def test_network_policy_admits_only_the_jobs_own_pods_and_monitoring():
    single = one(render(), "NetworkPolicy")
    multi_gpu = one(render(SCENARIOS["multi-worker-4x1gpu"]), "NetworkPolicy")
    cpu = one(render(SCENARIOS["cpu-only-2x0"]), "NetworkPolicy")
    job = one(render(), "Job")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    own = {**pod_labels, "batch.kubernetes.io/job-name": job["metadata"]["name"]}  # the Job controller's label

    assert single["spec"]["policyTypes"] == ["Ingress"]
    selector = single["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= own.items() and selector["batch.kubernetes.io/job-name"] == job["metadata"]["name"]
    peers, monitoring = single["spec"]["ingress"]
    assert peers["from"] == [{"podSelector": {"matchLabels": selector}}]  # not merely the release's labels
    assert peers["ports"] == [{"port": WORKER_PORT, "protocol": "TCP"}]
    assert monitoring["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert monitoring["ports"] == [{"port": METRICS_PORT, "protocol": "TCP"}]
    assert "ports" not in multi_gpu["spec"]["ingress"][0]  # NCCL between pods picks its own ports
    assert cpu["spec"]["ingress"][0]["ports"] == [{"port": WORKER_PORT, "protocol": "TCP"}]
    assert "ports" not in one(render({"networkPolicy": {"peerPorts": "all"}}), "NetworkPolicy")["spec"]["ingress"][0]
    assert "NetworkPolicy" not in kinds(render(SCENARIOS["network-policy-off"]))


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_every_port_is_open_only_to_the_jobs_own_pods_or_to_named_ports(scenario):
    """An ingress rule without ports (every port) may only come from this Job's own pods."""
    docs = render(SCENARIOS[scenario])
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    job_name = one(docs, "Job")["metadata"]["name"]
    for policy in policies:
        for rule in policy["spec"]["ingress"] + policy["spec"].get("egress", []):
            if "ports" not in rule:
                peers = rule.get("from", rule.get("to"))
                assert peers, f"{scenario}: a rule admits every port from anywhere"
                for peer in peers:
                    assert set(peer) == {"podSelector"}, f"{scenario}: every port open to {peer}"
                    assert peer["podSelector"]["matchLabels"]["batch.kubernetes.io/job-name"] == job_name


def test_egress_policy_is_opt_in_and_admits_dns_https_metadata_and_peers():
    assert "egress" not in one(render(WORKLOAD_IDENTITY), "NetworkPolicy")["spec"]
    policy = one(render(merge(WORKLOAD_IDENTITY, EGRESS)), "NetworkPolicy")["spec"]
    rules = policy["egress"]

    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert rules[0] == {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    https = rules[1]
    assert https["ports"] == [{"port": 443, "protocol": "TCP"}]
    assert https["to"][0]["ipBlock"]["cidr"] == "0.0.0.0/0" and "10.0.0.0/8" in https["to"][0]["ipBlock"]["except"]
    metadata = [(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in rules[2:4]]
    assert metadata == [("169.254.169.254/32", 80), ("169.254.169.252/32", 988)]  # Workload Identity's tokens
    assert rules[4]["to"] == policy["ingress"][0]["from"] and rules[4]["ports"] == [
        {"port": WORKER_PORT, "protocol": "TCP"}
    ]
    no_wi = one(render(EGRESS), "NetworkPolicy")["spec"]["egress"]
    assert not any("169.254" in json.dumps(r) for r in no_wi)  # no Workload Identity: no metadata server
    extra = {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"port": 9091}],
    }
    with_extra = one(render(merge(EGRESS, {"networkPolicy": {"egress": {"extra": [extra]}}})), "NetworkPolicy")
    assert with_extra["spec"]["egress"][-1] == extra


# --------------------------------------------------------------------------- monitoring hooks


def test_the_helm_test_pod_runs_trainer_doctor_as_the_workers_do():
    docs = render(merge(WORKLOAD_IDENTITY, {"workers": 4}))
    test, job = one(docs, "Pod"), one(docs, "Job")
    spec, worker = test["spec"], job["spec"]["template"]["spec"]
    (doctor,) = spec["containers"]
    env = {e["name"]: e for e in doctor["env"]}
    worker_env = {e["name"]: e for e in worker["containers"][0]["env"]}

    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert doctor["command"] == [ENTRYPOINT] and doctor["args"] == [
        "doctor",
        "--config",
        f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE_NAME}",
    ]
    assert spec["serviceAccountName"] == worker["serviceAccountName"]  # the workers' identity
    assert spec["volumes"][0] == worker["volumes"][0]  # the run's ConfigMap
    for name in ("TRAINER_NUM_WORKERS", "TRAINER_JOB_NAME", "TRAINER_SERVICE_NAME", "TRAINER_WORKER_PORT"):
        assert env[name] == worker_env[name]
    assert env["TRAINER_GPUS_PER_WORKER"]["value"] == "0" and worker_env["TRAINER_GPUS_PER_WORKER"]["value"] == "1"
    assert "nvidia.com/gpu" not in doctor["resources"]["limits"] and "tolerations" not in spec
    assert "batch.kubernetes.io/job-name" not in test["metadata"]["labels"]  # no peer of the workers
    assert test["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    gpu_test = one(render({"helmTest": {"gpus": True}, "nodeSelector": {"pool": "l4"}}), "Pod")["spec"]
    assert gpu_test["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_test["nodeSelector"] == {"pool": "l4"} and gpu_test["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_objects_follow_the_toggles():
    assert kinds(render()) == ["ConfigMap", "Job", "NetworkPolicy", "Pod", "Service", "ServiceAccount"]
    assert "Pod" not in kinds(render({"helmTest": {"enabled": False}}))
    assert kinds(render(MONITORING_ALL)) == [
        "ConfigMap",
        "ConfigMap",
        "Job",
        "NetworkPolicy",
        "Pod",
        "PodMonitor",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
    ]
    assert "ServiceMonitor" in kinds(render(SCENARIOS["monitoring-service"]))


def test_monitoring_pod_monitor_scrapes_every_worker():
    docs = render(MONITORING_ALL)
    monitor = one(docs, "PodMonitor")
    pod_labels = one(docs, "Job")["spec"]["template"]["metadata"]["labels"]

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == METRICS_PORT_NAME
    assert endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s"


def test_monitoring_service_monitor_selects_the_headless_service():
    docs = render(SCENARIOS["monitoring-service"])
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["port"] == METRICS_PORT_NAME
    assert endpoint["interval"] == "15s"


RULES_FILE = CHART / "rules" / "vgg-trainer.rules.yaml"
DASHBOARD_FILE = CHART / "dashboards" / "vgg-trainer.json"


def test_monitoring_prometheus_rule_carries_the_rules_file_scoped_to_the_release():
    rule = one(render(MONITORING_ALL), "PrometheusRule")
    source = yaml.safe_load(RULES_FILE.read_text())
    scope = f'namespace="{NAMESPACE}", pod=~"{RELEASE}-vgg-trainer-.+"'

    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert len(rule["spec"]["groups"]) == len(source["groups"])
    for rendered, original in zip(rule["spec"]["groups"], source["groups"], strict=True):
        assert rendered["name"] == original["name"]
        for r, o in zip(rendered["rules"], original["rules"], strict=True):
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}
            assert r["alert"] == o["alert"] and r["alert"][0].isupper() and r["labels"]["severity"]
            # Every selector of the file is scoped: the marker is gone, the release's matchers are in.
            assert 'namespace!=""' not in r["expr"]
            assert r["expr"] == o["expr"].replace('namespace!=""', scope)
            assert r["expr"].count(scope) == o["expr"].count('namespace!=""') > 0
            assert r["annotations"] == o["annotations"]  # Prometheus templating survives Helm
            assert "{{ $labels.job_name }}" in r["annotations"]["description"]


def test_monitoring_prometheus_rule_scope_all_keeps_the_file_as_it_is():
    values = {"monitoring": {"prometheusRule": {"enabled": True, "scope": "all"}}}
    rule = one(render(values), "PrometheusRule")

    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_monitoring_monitors_relabel_the_run_and_the_worker_index():
    expected = [
        {"sourceLabels": ["__meta_kubernetes_pod_label_batch_kubernetes_io_job_name"], "targetLabel": "job_name"},
        {
            "sourceLabels": ["__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index"],
            "targetLabel": "worker",
        },
    ]
    (pod_endpoint,) = one(render(MONITORING_ALL), "PodMonitor")["spec"]["podMetricsEndpoints"]
    (service_endpoint,) = one(render(SCENARIOS["monitoring-service"]), "ServiceMonitor")["spec"]["endpoints"]
    docs = render(MONITORING_ALL)

    assert pod_endpoint["relabelings"] == service_endpoint["relabelings"] == expected
    # What the relabelings read exists on the Job's pods: Kubernetes puts the job-name label and the
    # completion-index annotation on every pod of an Indexed Job; the chart's env reads the latter too.
    index_env = env_of(docs)[Env.COMPLETION_INDEX.value]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_env == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_job_reports_its_image_to_the_trainer():
    docs = render({"image": {"repository": "europe-docker.pkg.dev/p/ml/vgg-trainer", "tag": "1.2.3"}})

    assert env_of(docs)[Env.IMAGE.value]["value"] == "europe-docker.pkg.dev/p/ml/vgg-trainer:1.2.3"


def test_monitoring_grafana_dashboard_for_the_sidecar():
    docs = render(SCENARIOS["monitoring-service"])
    (dashboard_cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    (text,) = dashboard_cm["data"].values()
    dashboard = json.loads(text)

    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard_cm["metadata"]["annotations"]["grafana_folder"] == "ML"
    assert dashboard_cm["metadata"]["namespace"] == "monitoring"
    assert dashboard == json.loads(DASHBOARD_FILE.read_text())  # the one source, unchanged
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "namespace", "job"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all("$namespace" in e for e in exprs)
    assert any(METRIC_PREFIX in e for e in exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_operator_objects_need_the_clusters_crds_unless_forced():
    path = values_file(merge(REQUIRED, MONITORING_ALL))
    try:
        plain = run([helm(), "template", "flowers", str(CHART), "-f", path, "-n", NAMESPACE])
        forced = run(
            [helm(), "template", "flowers", str(CHART), "-f", path, "-n", NAMESPACE, "--set", "monitoring.crds=always"]
        )
        notes = run([helm(), "install", "flowers", str(CHART), "-f", path, "-n", NAMESPACE, "--dry-run=client"])
    finally:
        os.unlink(path)
    rendered = [d["kind"] for d in yaml.safe_load_all(plain.stdout) if d]

    assert not {"PodMonitor", "PrometheusRule"} & set(rendered)  # no monitoring.coreos.com/v1 served
    assert "ConfigMap" in rendered and rendered.count("ConfigMap") == 2  # the dashboard needs no CRD
    assert {"PodMonitor", "PrometheusRule"} <= {d["kind"] for d in yaml.safe_load_all(forced.stdout) if d}
    assert "WARNING: the cluster serves no monitoring.coreos.com/v1" in notes.stdout
    assert {"PodMonitor", "PrometheusRule"} <= set(kinds(render(MONITORING_ALL)))  # helm_cmd passes OPERATOR


def test_monitoring_off_renders_no_monitoring_objects():
    assert not {"PodMonitor", "ServiceMonitor", "PrometheusRule"} & set(kinds(render(SCENARIOS["monitoring-off"])))


def test_pod_and_service_monitor_together_are_refused():
    err = render_error({"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})

    assert "enable podMonitor or serviceMonitor, not both" in err


# --------------------------------------------------------------------------- names and runs

DNS_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
LONG_RELEASE = "a-very-long-release-name-for-a-training-run-of-vgg16"  # 52
MAX_RELEASE = "r" + "x" * 51 + "9"  # 53 characters: Helm's limit


@pytest.mark.parametrize(
    "release", ["flowers", "vgg-trainer", "1st-run", "run.v2", LONG_RELEASE, MAX_RELEASE, MAX_RELEASE[:-1] + "8"]
)
def test_release_names_give_valid_length_limited_names(release):
    docs = render({"workers": 1000, "gpusPerWorker": 0, **MONITORING_ALL}, release=release)
    job = one(docs, "Job")
    job_name = job["metadata"]["name"]
    service_name = one(docs, "Service")["metadata"]["name"]

    assert len(MAX_RELEASE) == 53
    for doc in docs:
        name = doc["metadata"]["name"]
        assert re.match(DNS_LABEL, name) and len(name) <= 63, name
        for key, value in doc["metadata"].get("labels", {}).items():
            assert len(value) <= 63, (key, value)
    # The last pod's hostname "<job>-<index>" and the Service name are DNS labels.
    assert len(f"{job_name}-999") <= 63
    assert re.match(DNS_LABEL, service_name)
    assert len(f"{job_name}-999.{service_name}.{NAMESPACE}.svc.cluster.local") <= 253


def test_long_release_names_do_not_collide():
    a = one(render(release=MAX_RELEASE), "Service")["metadata"]["name"]
    b = one(render(release=MAX_RELEASE[:-1] + "8"), "Service")["metadata"]["name"]

    assert a != b
    assert len(a) == len(b) == 40


def test_helm_refuses_a_release_name_over_53_characters():
    proc = helm_cmd("template", REQUIRED, release=MAX_RELEASE + "x")

    assert proc.returncode != 0
    assert "release name" in proc.stderr.lower()


def test_job_name_follows_its_spec_so_upgrades_replace_the_job():
    base = one(render(), "Job")["metadata"]["name"]
    again = one(render(), "Job")["metadata"]["name"]
    more_workers = one(render({"workers": 2}), "Job")["metadata"]["name"]
    other_config = one(render({"trainer": {"train": {"batch_size_per_replica": 16}}}), "Job")["metadata"]["name"]
    suspended = one(render({"job": {"suspend": True}}), "Job")
    named = render({"job": {"runId": "rescale-2"}})

    assert base == again
    assert len({base, more_workers, other_config}) == 3
    assert suspended["metadata"]["name"] == base  # suspend/resume in place
    assert suspended["spec"]["suspend"] is True
    assert one(named, "Job")["metadata"]["name"].endswith("-rescale-2")
    # The configuration belongs to its Job: a new run never changes the file a running pod reads.
    volumes = one(named, "Job")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": one(named, "ConfigMap")["metadata"]["name"]}} in volumes
    assert one(named, "ConfigMap")["metadata"]["name"].startswith(one(named, "Job")["metadata"]["name"])


def test_config_checksum_changes_with_the_configuration():
    def checksum(values):
        return one(render(values), "Job")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = checksum({})

    assert checksum({}) == base
    assert checksum({"trainer": {"phases": {"fine_tuning": {"epochs": 9}}}}) != base
    assert checksum({"output": "gs://ml-runs/runs/other"}) != base
    assert checksum({"workers": 2}) == base  # not in the file (the Job name changes instead)


def test_notes_explain_logs_metrics_scaling_and_cleanup():
    path = values_file(merge(REQUIRED, MONITORING_ALL, {"workers": 4}))
    try:
        proc = run([helm(), "install", "flowers", str(CHART), "-f", path, "-n", NAMESPACE, "--dry-run=client"])
    finally:
        os.unlink(path)
    notes = proc.stdout.split("NOTES:", 1)[1]
    job_name = one(render(merge(MONITORING_ALL, {"workers": 4})), "Job")["metadata"]["name"]

    assert f"kubectl -n {NAMESPACE} logs -f -l batch.kubernetes.io/job-name={job_name}" in notes
    assert "port-forward pod/" in notes and str(METRICS_PORT) in notes
    assert "Dashboard:" in notes
    assert "--set workers=N" in notes and "job.suspend=true" in notes
    assert "helm uninstall flowers" in notes
    assert f"trainer status flowers -n {NAMESPACE} --watch" in notes


def test_kubernetes_validation_catches_mistakes(k8s_schemas):
    """The validator is not vacuous: a wrong type and an unknown field fail on every version."""
    job = json.loads(json.dumps(one(render(), "Job")))
    job["spec"]["completions"] = "1"
    job["spec"]["template"]["spec"]["containers"][0]["cmd"] = ["trainer"]

    for version in K8S_VERSIONS:
        errors = "\n".join(k8s_schemas.errors(job, version))
        assert "spec.completions: '1' is not of type 'integer'" in errors
        assert "'cmd' was unexpected" in errors
