"""values.schema.json and the chart's own checks refuse bad values with messages naming the value;
the schema of the trainer's configuration and the chart's copy of the contract stay in sync."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml
from chart_helpers import CHART, REQUIRED, ROOT, helm_cmd, merge, one, render, render_error

from trainer import config as config_lib
from trainer import config_docs, contract

SCHEMA_ERROR = "values don't meet the specifications of the schema(s)"

#: (bad values, what helm must say). Each is refused by values.schema.json before any template runs.
SCHEMA_REJECTS = [
    ({"workers": 0}, "at '/workers': minimum: got 0, want 1"),
    ({"workers": "4"}, "at '/workers': got string, want integer"),
    ({"gpusPerWorker": -1}, "at '/gpusPerWorker': minimum: got -1, want 0"),
    ({"worker": 4}, "additional properties 'worker' not allowed"),
    ({"dataset": "s3://bucket/flowers"}, "at '/dataset': 's3://bucket/flowers' does not match pattern"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent'"),
    ({"image": {"digest": "sha256:abc"}}, "at '/image/digest': 'sha256:abc' does not match pattern"),
    ({"job": {"terminationGracePeriodSeconds": 5}}, "at '/job/terminationGracePeriodSeconds': minimum: got 5, want 30"),
    ({"job": {"runId": "Run_1"}}, "at '/job/runId': 'Run_1' does not match pattern"),
    ({"job": {"backoffLimit": -1}}, "at '/job/backoffLimit': minimum: got -1, want 0"),
    ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory': 'lots' does not match pattern"),
    ({"resources": {"limits": {"nvidia.com/gpu": 1}}}, "at '/resources/limits': additional properties 'nvidia.com"),
    ({"podLabels": {"team": True}}, "at '/podLabels/team': got boolean, want string"),
    ({"workerPlacement": "scatter"}, "at '/workerPlacement': value must be one of 'spread', 'pack', 'none'"),
    ({"fullnameOverride": "My_Run"}, "at '/fullnameOverride': 'My_Run' does not match pattern"),
    ({"workloadIdentity": {"enabled": True}}, "at '/workloadIdentity/gcpServiceAccount': minLength: got 0, want 1"),
    ({"kueue": {"enabled": True}}, "at '/kueue/queueName': minLength: got 0, want 1"),
    ({"networkPolicy": {"peerPorts": "some"}}, "at '/networkPolicy/peerPorts': value must be one of"),
    ({"monitoring": {"podMonitor": {"interval": "often"}}}, "at '/monitoring/podMonitor/interval': 'often'"),
    ({"scratch": {"sizeLimit": "big"}}, "at '/scratch/sizeLimit': 'big' does not match pattern"),
    # The trainer's configuration, checked against its own schema (`trainer config --json-schema`).
    ({"trainer": {"phases": {"fine_tunning": {"epochs": 3}}}}, "at '/trainer/phases': additional properties 'fine_tu"),
    ({"trainer": {"train": {"batch_size_per_replica": 0}}}, "at '/trainer/train/batch_size_per_replica': minimum"),
    ({"trainer": {"phases": {"fine_tuning": {"epochs": -1}}}}, "at '/trainer/phases/fine_tuning/epochs': minimum"),
    ({"trainer": {"runtime": {"mixed_precision": "maybe"}}}, "at '/trainer/runtime/mixed_precision': value must"),
    ({"trainer": {"data": {"image_size": 16}}}, "at '/trainer/data/image_size': minimum: got 16, want 32"),
    (
        {"trainer": {"phases": {"fine_tuning": {"unfreeze_blocks": ["block6"]}}}},
        "at '/trainer/phases/fine_tuning/unfreeze_blocks/0': value must be one of 'block1'",
    ),
    ({"trainer": {"output": {"dir": "gs://x/y"}}}, "at '/trainer/output': additional properties 'dir' not allowed"),
    ({"trainer": {"data": {"dataset": "gs://x/y"}}}, "at '/trainer/data': additional properties 'dataset' not allowed"),
]

#: (bad values, message) refused by the chart's templates (checks across values, readable messages).
TEMPLATE_REJECTS = [
    ({"commonLabels": {"app.kubernetes.io/name": "x"}}, "commonLabels: app.kubernetes.io/name is set by the chart"),
    (
        {"commonLabels": {"team": "a"}, "podLabels": {"team": "b"}},
        "commonLabels and podLabels both set team",
    ),
    (
        {"kueue": {"enabled": True, "queueName": "team-a"}, "job": {"suspend": True}},
        "job.suspend with kueue.enabled: Kueue owns the Job's spec.suspend",
    ),
    (
        {"kueue": {"enabled": True, "queueName": "q", "topology": {"required": "rack", "preferred": "block"}}},
        "kueue.topology: set required or preferred, not both",
    ),
    ({"kueue": {"topology": {"preferred": "block"}}}, "kueue.topology needs kueue.enabled=true"),
    ({"extraEnv": [{"name": "TF_CONFIG", "value": "{}"}]}, "extraEnv[0]: TF_CONFIG is set by the chart"),
    (
        {"extraEnv": [{"name": "A", "value": "1"}, {"name": "TRAINER_NUM_WORKERS", "value": "9"}]},
        "extraEnv[1]: TRAINER_NUM_WORKERS is set by the chart",
    ),
    (
        {"extraVolumes": [{"name": "host", "hostPath": {"path": "/data"}}]},
        'extraVolumes[0] (host): hostPath volumes break Pod Security "restricted"',
    ),
    (
        {"extraVolumes": [{"name": "shared", "nfs": {"server": "nfs.example", "path": "/data"}}]},
        'extraVolumes[0] (shared): nfs volumes break Pod Security "restricted", which admits only configMap, csi,',
    ),
    (
        {
            "extraVolumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "flowers"}},
                {"name": "disk", "gcePersistentDisk": {"pdName": "flowers"}},
            ]
        },
        'extraVolumes[1] (disk): gcePersistentDisk volumes break Pod Security "restricted"',
    ),
    ({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]}, "extraVolumes[0]: the name tmp is the chart's own volume"),
    # Labels the chart's selectors use: a podLabels value would replace them and break selection.
    (
        {"podLabels": {"team": "vision", "app.kubernetes.io/instance": "other"}},
        "podLabels: app.kubernetes.io/instance is set by the chart (flowers) and selects this release's pods",
    ),
    ({"podLabels": {"app.kubernetes.io/name": "x"}}, "podLabels: app.kubernetes.io/name is set by the chart"),
    ({"podLabels": {"app.kubernetes.io/component": "x"}}, "podLabels: app.kubernetes.io/component is set by the"),
    (
        {"podLabels": {"batch.kubernetes.io/job-name": "x"}},
        "podLabels: batch.kubernetes.io/job-name is set by Kubernetes on a Job's pods and selects them",
    ),
    ({"podLabels": {"job-name": "x"}}, "podLabels: job-name is set by Kubernetes on a Job's pods"),
    # The ConfigMap is not secret: credentials come from a Secret (monitoring.pushgateway).
    (
        {"trainer": {"monitoring": {"pushgateway_url": "https://pusher:s3cret@push.example/"}}},
        "trainer.monitoring.pushgateway_url: carries credentials (user:password@), which the ConfigMap would store "
        "in clear; put the whole URL in a Secret and set monitoring.pushgateway.existingSecret",
    ),
    (
        {"trainer": {"monitoring": {"pushgateway_url": "https://s3cret@push.example"}}},
        "trainer.monitoring.pushgateway_url: carries credentials",
    ),
    (
        {"trainer": {"monitoring": {"pushgateway_url": "pusher:s3cret@push.example:9091"}}},
        "trainer.monitoring.pushgateway_url: carries credentials",
    ),
    (
        {
            "monitoring": {"pushgateway": {"existingSecret": "pushgateway-auth"}},
            "trainer": {"monitoring": {"pushgateway_url": "http://pushgateway.monitoring:9091"}},
        },
        "monitoring.pushgateway.existingSecret and trainer.monitoring.pushgateway_url are both set",
    ),
    (
        {"extraEnv": [{"name": "TRAINER_PUSHGATEWAY_URL", "value": "https://pusher:s3cret@push.example/"}]},
        "extraEnv[0]: TRAINER_PUSHGATEWAY_URL is set by the chart",
    ),
    # Metrics endpoints the liveness probe and Prometheus cannot reach: every pod would be killed.
    ({"trainer": {"monitoring": {"port": 0}}}, "trainer.monitoring.port: 0 (any free port) cannot work in a pod"),
    ({"trainer": {"monitoring": {"port": 80}}}, "trainer.monitoring.port: 80 is below 1024"),
    (
        {"trainer": {"monitoring": {"port": contract.WORKER_PORT}}},
        f"trainer.monitoring.port: {contract.WORKER_PORT} is the worker port",
    ),
    (
        {"trainer": {"monitoring": {"address": "127.0.0.1"}}},
        "trainer.monitoring.address: 127.0.0.1 is not reachable from the kubelet's liveness probe and Prometheus",
    ),
    ({"trainer": {"monitoring": {"address": "localhost"}}}, "trainer.monitoring.address: localhost is not reachable"),
    ({"trainer": {"monitoring": {"address": "::1"}}}, "trainer.monitoring.address: ::1 is not reachable"),
    (
        {
            "workloadIdentity": {"enabled": True, "gcpServiceAccount": "trainer@my-project.iam.gserviceaccount.com"},
            "serviceAccount": {"create": False},
        },
        "workloadIdentity.enabled annotates the ServiceAccount the chart creates",
    ),
    ({"workerPlacement": "pack", "affinity": {"podAffinity": {}}}, "workerPlacement=pack is ignored when affinity"),
    (
        {"trainer": {"data": {"staging": {"enabled": True, "budget_gb": 30}}}, "scratch": {"sizeLimit": "20Gi"}},
        "trainer.data.staging.budget_gb (30 GB) exceeds scratch.sizeLimit (20Gi)",
    ),
]


@pytest.mark.parametrize(("values", "message"), SCHEMA_REJECTS, ids=[m.split(":")[0] for _, m in SCHEMA_REJECTS])
def test_schema_rejects_bad_values_naming_them(values, message):
    err = render_error(values)

    assert SCHEMA_ERROR in err
    assert message in err


def test_schema_reports_every_problem_at_once():
    err = render_error({"workers": 0, "gpusPerWorker": -1, "trainer": {"train": {"batch_size_per_replica": 0}}})

    for path in ("/workers", "/gpusPerWorker", "/trainer/train/batch_size_per_replica"):
        assert f"at '{path}'" in err


@pytest.mark.parametrize(("values", "message"), TEMPLATE_REJECTS, ids=[m.split(":")[0] for _, m in TEMPLATE_REJECTS])
def test_chart_rejects_conflicting_values_with_a_fix(values, message):
    err = render_error(values)

    assert message in err
    assert "s3cret" not in err  # a refused secret is not repeated either


@pytest.mark.parametrize(
    "values",
    [
        {"trainer": {"monitoring": {"port": 1024}}},
        {"trainer": {"monitoring": {"port": 65535, "address": "0.0.0.0"}}},
        {"trainer": {"monitoring": {"address": "::"}}},
        {"podLabels": {"team": "vision", "app.kubernetes.io/part-of": "research"}},
        {"trainer": {"monitoring": {"pushgateway_url": "http://pushgateway.monitoring:9091/"}}},
        {
            "extraVolumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "flowers", "readOnly": True}},
                {"name": "bucket", "csi": {"driver": "gcsfuse.csi.storage.gke.io"}},
                {"name": "fast", "ephemeral": {"volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"]}}}},
                {"name": "info", "downwardAPI": {"items": []}},
                {"name": "both", "projected": {"sources": []}},
                {"name": "cache"},  # no type: an emptyDir
            ]
        },
    ],
    ids=["port-1024", "port-65535", "address-ipv6-any", "other-pod-labels", "plain-pushgateway", "restricted-volumes"],
)
def test_values_next_to_the_refused_ones_render(values):
    render(values)


def test_the_grace_period_must_cover_a_stop_check_plus_the_margin():
    margin = contract.STOP_MARGIN_SECONDS  # the chart must use the trainer's margin
    default_check = config_lib.RuntimeConfig().stop_check_seconds
    render({"job": {"terminationGracePeriodSeconds": int(default_check + margin)}})  # the defaults fit exactly

    for check in (15, 100):
        runtime = {"trainer": {"runtime": {"stop_check_seconds": check}}}
        err = render_error({**runtime, "job": {"terminationGracePeriodSeconds": check + margin - 1}})
        assert f"trainer.runtime.stop_check_seconds ({check} s) + {margin} s" in err
        assert f"raise the grace to at least {check + margin}" in err
        render({**runtime, "job": {"terminationGracePeriodSeconds": check + margin}})


def test_staging_budget_follows_the_scratch_volume_unless_set():
    staging = {"trainer": {"data": {"staging": {"enabled": True}}}}

    assert config_lib.StagingConfig().budget_gb == 0  # the trainer's "follow the disk"
    assert staged_config(staging)["budget_gb"] == 19.32  # 90% of the default 20Gi, in GB
    assert staged_config({**staging, "scratch": {"sizeLimit": "100G"}})["budget_gb"] == 90.0
    assert "budget_gb" not in staged_config({"trainer": {"data": {"staging": {"enabled": True, "dir": "/data/s"}}}})
    set_budget = {"trainer": {"data": {"staging": {"enabled": True, "budget_gb": 5}}}}
    assert staged_config(set_budget)["budget_gb"] == 5


def test_a_staging_budget_set_beyond_the_scratch_volume_is_refused():
    staging = {"trainer": {"data": {"staging": {"enabled": True, "budget_gb": 30}}}}

    err = render_error({**staging, "scratch": {"sizeLimit": "20Gi"}})
    assert "trainer.data.staging.budget_gb (30 GB) exceeds scratch.sizeLimit (20Gi)" in err
    assert "leave it unset (it follows scratch.sizeLimit)" in err
    render({**staging, "scratch": {"sizeLimit": "30Gi"}})
    render({"trainer": {"data": {"staging": {"enabled": True, "budget_gb": 30, "dir": "/data/stage"}}}})


def staged_config(values: dict) -> dict:
    """trainer.data.staging of the ConfigMap's config.yaml rendered with ``values``."""
    config_map = one(render(values), "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["data"]["staging"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"output": "gs://ml-runs/run"}, "dataset is required: --set dataset=gs://BUCKET/PREFIX"),
        ({"dataset": "gs://ml-data/flowers"}, "output is required: --set output=gs://BUCKET/PREFIX"),
    ],
)
def test_dataset_and_output_are_required(values, message):
    assert message in render_error(values, with_required=False)


def test_trainer_schema_matches_the_trainer_configuration():
    schema = json.loads((CHART / "values.schema.json").read_text())

    assert schema["properties"]["trainer"] == config_docs.chart_schema(), (
        "the chart's schema of `trainer` is out of date with trainer/config.py: run "
        "`.venv/bin/python -c 'from trainer import config_docs; config_docs.write_chart_schema()'`"
    )


def test_the_charts_contract_is_trainer_contract():
    text = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "vgg-trainer\.contract" -}}\n(.*?)\n{{- end }}', text, re.S).group(1)
    chart = yaml.safe_load(block)

    assert chart == {
        "uid": contract.CONTAINER_UID,
        "gid": contract.CONTAINER_GID,
        "containerName": contract.CONTAINER_NAME,
        "command": contract.ENTRYPOINT,
        "configDir": contract.CONFIG_MOUNT_DIR,
        "configFile": contract.CONFIG_FILE_NAME,
        "scratchDir": contract.SCRATCH_MOUNT_DIR,
        "workerPort": contract.WORKER_PORT,
        "workerPortName": contract.WORKER_PORT_NAME,
        "metricsPort": contract.METRICS_PORT,
        "metricsPortName": contract.METRICS_PORT_NAME,
        "healthPath": contract.HEALTH_PATH,
        "exitPreempted": contract.ExitCode.PREEMPTED,
        "exitNonRetriable": sorted(int(c) for c in contract.NON_RETRIABLE_EXIT_CODES),
        "leaseSeconds": contract.DEFAULT_LEASE_SECONDS,
    }


def test_chart_metadata_matches_the_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)

    assert chart["apiVersion"] == "v2"
    assert chart["name"] == contract.CHART_NAME
    assert chart["appVersion"] == version
    assert (CHART / "templates" / "NOTES.txt").is_file()


def _value_paths(values: dict, schema: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the chart's values, down to maps the schema leaves free-form (labels, resources)."""
    paths = []
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else key
        assert key in schema.get("properties", {}), f"{path}: in values.yaml but not in values.schema.json"
        sub = schema["properties"][key]
        if isinstance(value, dict) and "properties" in sub and path != "trainer":
            paths += _value_paths(value, sub, path)
        else:
            paths.append(path)
    return paths


def test_every_value_is_in_the_schema_and_the_reference():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    reference = (ROOT / "docs" / "helm.md").read_text().split("## 3. Values reference")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([^`]+)` \|", reference, re.M))
    paths = _value_paths(values, schema)

    assert set(schema["properties"]) - {"global"} == set(values), "schema and values.yaml name different values"
    assert not set(paths) - documented, f"values missing from docs/helm.md's reference: {set(paths) - documented}"
    assert not documented - set(paths), f"docs/helm.md documents unknown values: {documented - set(paths)}"


def test_values_yaml_comments_every_value():
    """Every key of the first two levels has a comment right above it (docs/helm.md has the rest)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^( {0,2})([A-Za-z][\w.-]*):", line)
        if match and not lines[i - 1].strip().startswith("#"):
            undocumented.append(match.group(2))

    assert not undocumented, f"values.yaml: no comment above {undocumented}"


def test_schema_is_valid_draft_07_and_accepts_the_defaults():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = {**yaml.safe_load((CHART / "values.yaml").read_text()), **REQUIRED}

    jsonschema.Draft7Validator.check_schema(schema)  # Helm 3 and 4 both read draft 7
    assert [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)] == []


def test_helm_lint_strict_does_not_run_the_charts_checks_but_template_does():
    """docs/helm.md, "What validates values": lint reports a `fail` as INFO and passes."""
    both_monitors = {"monitoring": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
    lint = helm_cmd("lint", merge(REQUIRED, both_monitors))

    assert lint.returncode == 0 and "0 chart(s) failed" in lint.stdout
    assert "enable podMonitor or serviceMonitor, not both" in render_error(both_monitors)
    assert "validates values" in (ROOT / "docs" / "helm.md").read_text()


def test_the_chart_readme_is_generated_from_values_yaml():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart-readme.py"), "--check"], capture_output=True)

    assert proc.returncode == 0, proc.stderr.decode()
    readme = (CHART / "README.md").read_text()
    assert '| `kueue.topology.required` | `""` | Level all workers must be placed in' in readme
