"""The local Job runner (trainer.jobrunner) on the real chart's rendered manifests.

The fast tests render helm/vgg-trainer with real `helm template` and run the Job with the
`trainer` entrypoint mapped to a stand-in script (written below) that records its environment,
arguments and mounted config file, then does what a per-index plan says: exit 0/65/75/76, sleep
until signalled (optionally ignoring SIGTERM), or talk to its peers on port 2222. They check the
pod environment (fieldRefs, index, namespace, TF_CONFIG), the ConfigMap as a file, the
podFailurePolicy (FailJob, Count up to backoffLimit, Ignore), pod replacement (never two live
pods per index), grace periods, deadlines, conditions and the CLI. No TensorFlow.

The slow test runs the real trainer through the runner on a corrupt dataset; real multi-worker
runs through the runner are in tests/train/test_multi_worker_faults.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
import yaml

from tests.support.jobs import (
    ISOLATED,
    NAMESPACE,
    ROOT,
    TINY_TRAINER,
    Capture,
    assert_one_live_pod_per_index,
    condition_types,
    needs_namespaces,
    render,
)
from trainer.cluster import parse_tf_config, tf_config_from_env
from trainer.contract import WORKER_PORT, ExitCode
from trainer.errors import ConfigError
from trainer.jobrunner import JobRunner, load_manifests
from trainer.jobrunner.network import PodNetwork, pod_address
from trainer.jobrunner.podspec import expand, rewrite_path


def _userns_available() -> bool:
    flags = ["--user", "--map-root-user", "--net", "--mount", "--uts"]
    return ISOLATED and subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0


STANDIN = textwrap.dedent(
    """
    import json, os, signal, socket, sys, time
    from pathlib import Path

    plan_file = Path(os.environ["STANDIN_PLAN"])
    state = plan_file.parent
    index = os.environ["JOB_COMPLETION_INDEX"]
    with open(state / f"attempts-{index}", "a") as f:
        f.write("x")
    attempt = len((state / f"attempts-{index}").read_text()) - 1
    plan = json.loads(plan_file.read_text())
    steps = plan.get(index, plan.get("*", ["ok"]))
    step = steps[min(attempt, len(steps) - 1)]
    record = {
        "argv": sys.argv[1:], "env": dict(os.environ), "hostname": socket.gethostname(),
        "attempt": attempt, "step": step, "peers": {},
    }
    if "--config" in sys.argv:
        record["config"] = Path(sys.argv[sys.argv.index("--config") + 1]).read_text()

    def save():
        (state / f"record-{os.environ['STANDIN_POD']}.json").write_text(json.dumps(record))

    def resolve_peers():
        from trainer.cluster import parse_tf_config, tf_config_from_env
        cluster = parse_tf_config(tf_config_from_env(os.environ))
        return [w.rsplit(":", 1) for w in cluster.workers]

    if os.environ.get("TRAINER_NUM_WORKERS", "1") != "1":
        for host, _ in resolve_peers():
            try:
                record["peers"][host] = socket.gethostbyname(host)
            except OSError as err:
                record["peers"][host] = f"unresolved: {err}"
    save()
    print(f"step {step} attempt {attempt}", flush=True)
    if step == "ok":
        sys.exit(0)
    if step.startswith("exit:"):
        sys.exit(int(step[5:]))
    if step == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if step == "term76":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(76))
    if step == "listen":  # like TensorFlow's gRPC server: every address of the pod, one port
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", int(os.environ["TRAINER_WORKER_PORT"])))
        server.listen(16)

        def serve():
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.sendall(index.encode())

        threading.Thread(target=serve, daemon=True).start()
        answers, pending = {}, [(h, int(p)) for h, p in resolve_peers()]
        deadline = time.monotonic() + 20
        while pending and time.monotonic() < deadline:
            for host, port in list(pending):
                try:
                    with socket.create_connection((host, port), timeout=2) as c:
                        answers[host] = c.recv(16).decode()
                    pending.remove((host, port))
                except OSError:
                    time.sleep(0.05)
        record["answers"] = answers
        save()
        time.sleep(2)  # keep answering peers that are still asking
        sys.exit(0 if not pending else 1)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


# --- helpers ---------------------------------------------------------------------------------


class Harness:
    """Renders the chart with the stand-in wired in and runs the Job."""

    def __init__(self, tmp_path: pathlib.Path):
        self.dir = tmp_path
        self.standin = tmp_path / "standin.py"
        self.standin.write_text(STANDIN)
        self.sink = Capture()

    def manifests(self, plan: dict[str, list[str]], skip_schema: bool = False, **values: Any) -> str:
        plan_file = self.dir / "plan.json"
        plan_file.write_text(json.dumps(plan))
        extra_env = [
            {"name": "STANDIN_PLAN", "value": str(plan_file)},
            {"name": "STANDIN_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "STANDIN_CONFIG_COPY", "value": "$(TRAINER_CONFIG)"},
        ]
        return render(self.dir, {"extraEnv": extra_env, **values}, skip_schema=skip_schema)

    def runner(self, manifests: str, **kwargs: Any) -> JobRunner:
        kwargs.setdefault("namespace", NAMESPACE)
        return JobRunner(
            manifests,
            executables={"trainer": [sys.executable, str(self.standin)]},
            sink=self.sink,
            **kwargs,
        )

    def records(self) -> dict[str, dict]:
        return {p.name[len("record-") : -len(".json")]: json.loads(p.read_text()) for p in self.dir.glob("record-*")}


@pytest.fixture
def harness(tmp_path) -> Harness:
    return Harness(tmp_path)


def starts(runner: JobRunner, index: int) -> list[str]:
    return [e.pod for e in runner.events if e.reason == "PodStarted" and e.index == index]


# --- unit ----------------------------------------------------------------------------------


def test_env_expansion_and_mount_path_rewriting():
    env = {"A": "x", "B": "/etc/trainer/config.yaml"}
    assert expand("$(A)-$(B)", env) == "x-/etc/trainer/config.yaml"
    assert expand("$$(A) $(MISSING) $$", env) == "$(A) $(MISSING) $"
    mounts = [("/etc/trainer", "/w/config"), ("/tmp", "/w/tmp")]
    assert rewrite_path("/etc/trainer/config.yaml", mounts) == "/w/config/config.yaml"
    assert rewrite_path("/etc/trainer", mounts) == "/w/config"
    assert rewrite_path("/etc/trainerx", mounts) == "/etc/trainerx"
    assert rewrite_path("/tmp/a", mounts) == "/tmp/a"  # the machine's /tmp stays reachable


def test_manifests_are_read_into_typed_models(tmp_path):
    from kubernetes.client import V1ConfigMap, V1Job, V1Service

    manifests = load_manifests(render(tmp_path, {"workers": 3}))
    job = manifests.job
    assert isinstance(job, V1Job)
    assert job.spec.completion_mode == "Indexed" and job.spec.completions == 3 and job.spec.parallelism == 3
    assert job.spec.pod_replacement_policy == "Failed"
    rules = job.spec.pod_failure_policy.rules
    assert [r.action for r in rules] == ["Ignore", "Ignore", "FailJob"]
    assert rules[2].on_exit_codes.values == [64, 65]
    assert all(isinstance(cm, V1ConfigMap) for cm in manifests.config_maps.values())
    service = manifests.headless_service()
    assert isinstance(service, V1Service) and service.metadata.name == job.spec.template.spec.subdomain
    assert any(name.startswith("ServiceAccount/") for name in manifests.ignored)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("kind: Job\nmetadata: [\n name", "line 3, column 6: expected ',' or ']', but got '<stream end>'"),
        ("kind: Job\nmetadata:\n  name: a\n  name: b\n", "line 4, column 3: key 'name' is given twice"),
    ],
)
def test_malformed_manifests_are_one_line_naming_the_file_line_and_column(tmp_path, text, where):
    path = tmp_path / "manifests.yaml"
    path.write_text(text)

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "job", "run", str(path)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == ExitCode.CONFIG_ERROR
    assert result.stderr.startswith(f"error: manifests file {path} is not valid YAML: {where}"), result.stderr
    assert result.stderr.count("\n") == 1


# --- the Job ---------------------------------------------------------------------------------


def test_pods_get_the_resolved_env_args_config_file_and_peer_names(harness):
    text = harness.manifests({"*": ["ok"]}, workers=3)
    manifests = load_manifests(text)
    job = manifests.job.metadata.name
    service = manifests.pod_spec.subdomain
    config_text = next(iter(manifests.config_maps.values())).data["config.yaml"]

    with harness.runner(text, keep_workdir=True) as runner:
        status = runner.run(timeout=30)
        workdir = runner.workdir
        assert condition_types(status) == [
            ("SuccessCriteriaMet", "CompletionsReached"),
            ("Complete", "CompletionsReached"),
        ]
        assert status.succeeded == 3 and status.failed == 0 and status.completed_indexes == "0-2"
        assert runner.exit_code == 0
        names = {e.index: e.pod for e in runner.events if e.reason == "PodStarted"}

    records = harness.records()
    assert set(records) == set(names.values())
    expected_peers = [f"{job}-{i}.{service}.{NAMESPACE}.svc:{WORKER_PORT}" for i in range(3)]
    scratch_dirs = set()
    for index, pod in names.items():
        rec, env = records[pod], records[pod]["env"]
        assert re.fullmatch(rf"{job}-{index}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", pod)
        assert env["STANDIN_POD"] == pod  # fieldRef metadata.name
        assert env["JOB_COMPLETION_INDEX"] == str(index)  # fieldRef on the index annotation
        assert env["TRAINER_NAMESPACE"] == NAMESPACE  # fieldRef metadata.namespace
        assert env["TRAINER_JOB_NAME"] == job and env["TRAINER_NUM_WORKERS"] == "3"
        assert env["HOSTNAME"] == f"{job}-{index}"
        # The ConfigMap volume is a per-pod directory; args and env point into it.
        config_path = rec["argv"][2]
        assert rec["argv"][:2] == ["train", "--config"]
        assert config_path == os.path.join(workdir, pod, "volumes", "config", "config.yaml")
        assert env["TRAINER_CONFIG"] == config_path == env["STANDIN_CONFIG_COPY"]  # $(VAR) expanded too
        assert rec["config"] == config_text
        scratch_dirs.add(env["TRAINER_SCRATCH_DIR"])
        assert env["TRAINER_SCRATCH_DIR"] == os.path.join(workdir, pod, "volumes", "scratch")
        assert env["TMPDIR"] == os.path.join(workdir, pod, "volumes", "tmp")
        cluster = parse_tf_config(tf_config_from_env(env))
        assert list(cluster.workers) == expected_peers and cluster.task_index == index
        if ISOLATED:
            assert rec["hostname"] == f"{job}-{index}"
            assert rec["peers"] == {p.rsplit(":", 1)[0]: pod_address(i) for i, p in enumerate(expected_peers)}
    assert len(scratch_dirs) == 3
    shutil.rmtree(workdir)
    assert f"[{names[0]}] step ok attempt 0" in harness.sink.text


def test_non_retriable_exit_fails_the_job_at_once_and_stops_the_others(harness):
    text = harness.manifests({"0": ["exit:65"], "*": ["sleep"]}, job={"backoffLimit": 5})
    with harness.runner(text) as runner:
        status = runner.run(timeout=30)
        assert condition_types(status) == [("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy")]
        assert "failed with exit code 65 matching FailJob rule" in status.conditions[-1].message
        assert len(starts(runner, 0)) == 1 and len(starts(runner, 1)) == 1  # no replacement
        failed = {e.index: e for e in runner.events if e.reason == "PodFailed"}
        assert failed[0].exit_code == 65 and failed[0].action == "FailJob"
        assert failed[1].exit_code == 128 + signal.SIGTERM and failed[1].action is None  # stopped with the Job
        assert status.active == 0 and status.succeeded == 0
        assert runner.exit_code == 65


def test_retriable_exit_is_counted_and_replaced_until_the_backoff_limit(harness):
    text = harness.manifests({"0": ["exit:75", "exit:75", "ok"], "1": ["ok"]}, job={"backoffLimit": 2})
    with harness.runner(text) as runner:
        status = runner.run(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
        assert status.failed == 2 and status.succeeded == 2
        assert len(set(starts(runner, 0))) == 3  # every replacement has a new name
        replaced = [e.replaces for e in runner.events if e.reason == "PodStarted" and e.index == 0]
        assert replaced == [None, *starts(runner, 0)[:2]]
        assert [e.action for e in runner.events if e.reason == "PodFailed"] == ["Count", "Count"]
        assert_one_live_pod_per_index(runner)

    for attempts in harness.dir.glob("attempts-*"):
        attempts.unlink()
    text = harness.manifests({"0": ["exit:75"], "1": ["ok"]}, job={"backoffLimit": 2})
    with harness.runner(text) as runner:
        status = runner.run(timeout=30)
        assert condition_types(status)[-1] == ("Failed", "BackoffLimitExceeded")
        assert status.failed == 3 and len(starts(runner, 0)) == 3  # failures > backoffLimit
        assert runner.exit_code == 75
        assert_one_live_pod_per_index(runner)


def test_preempted_exit_is_ignored_and_replaced_without_spending_the_budget(harness):
    text = harness.manifests({"0": ["exit:76", "exit:76", "ok"], "1": ["ok"]}, job={"backoffLimit": 0})
    with harness.runner(text) as runner:
        status = runner.run(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
        assert status.failed == 0
        assert len(set(starts(runner, 0))) == 3
        assert [e.action for e in runner.events if e.reason == "PodFailed"] == ["Ignore", "Ignore"]
        assert_one_live_pod_per_index(runner)


def test_deleted_pod_is_a_disruption_and_a_crash_is_counted(harness):
    text = harness.manifests({"0": ["sleep", "sleep", "ok"], "1": ["ok"]}, job={"backoffLimit": 1})
    with harness.runner(text) as runner:
        runner.start()
        first = runner.wait_for_log(0, "ready", timeout=15).name
        assert runner.delete_pod(0) == first  # eviction: SIGTERM -> exit 143, DisruptionTarget -> Ignore
        second = runner.wait_for(
            lambda: (p := runner.live_pod(0)) and p.name != first and "ready" in "".join(p.log) and p, 15
        ).name
        assert runner.status().failed == 0
        runner.kill_pod(0, signal.SIGKILL)  # a crash: exit 137, counted
        status = runner.wait(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
        assert status.failed == 1
        failed = [(e.pod, e.exit_code, e.action) for e in runner.events if e.reason == "PodFailed"]
        assert failed == [(first, 143, "Ignore"), (second, 137, "Count")]
        assert "step sleep attempt 0" in runner.pod_log(0, attempt=0)
        assert "step ok attempt 2" in runner.pod_log(0)
        assert_one_live_pod_per_index(runner)


def test_sigkill_after_the_grace_period_and_replacement_only_after_termination(harness):
    # The chart wants >= 30 s (a stop check and a backup need it); the runner takes any manifest's value.
    text = harness.manifests({"0": ["ignore-term", "ok"], "1": ["ok"]}, job={"terminationGracePeriodSeconds": 30})
    text = text.replace("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 2")
    assert "terminationGracePeriodSeconds: 2" in text
    with harness.runner(text) as runner:
        runner.start()
        runner.wait_for_log(0, "ready", timeout=15)
        runner.delete_pod(0)
        status = runner.wait(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
        events = runner.events
        deleting = next(e for e in events if e.reason == "PodDeleting")
        killed = next(e for e in events if e.reason == "PodFailed")
        replacement = [e for e in events if e.reason == "PodStarted" and e.index == 0][1]
        assert killed.exit_code == 128 + signal.SIGKILL and killed.action == "Ignore"
        assert 1.9 <= killed.time - deleting.time <= 4.0  # SIGTERM ignored, SIGKILL after 2 s
        assert replacement.time >= killed.time  # podReplacementPolicy: Failed
        assert status.failed == 0
        assert_one_live_pod_per_index(runner)


def test_active_deadline_fails_the_job_and_stops_its_pods(harness):
    text = harness.manifests({"*": ["sleep"]}, job={"activeDeadlineSeconds": 1})
    with harness.runner(text) as runner:
        start = time.monotonic()
        status = runner.run(timeout=30)
        assert condition_types(status) == [("FailureTarget", "DeadlineExceeded"), ("Failed", "DeadlineExceeded")]
        assert time.monotonic() - start < 10
        assert {e.exit_code for e in runner.events if e.reason == "PodFailed"} == {128 + signal.SIGTERM}
        assert runner.exit_code == 128 + signal.SIGTERM


@needs_namespaces
@pytest.mark.parametrize("workers, mode", [(3, None), (2, "userns")], ids=["default", "unprivileged"])
def test_every_pod_listens_on_the_worker_port_of_its_own_hostname(harness, workers, mode):
    # "unprivileged": the namespaces belong to a user namespace, as when the runner is not root.
    if mode == "userns" and not _userns_available():
        pytest.skip("unprivileged user namespaces are unavailable")
    text = harness.manifests({"*": ["listen"]}, workers=workers)
    network = PodNetwork(mode=mode) if mode else "auto"
    with harness.runner(text, network=network) as runner:
        status = runner.run(timeout=60)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached"), harness.sink.text[-3000:]
        job = runner.name
    records = harness.records()
    assert len(records) == workers
    for rec in records.values():
        # Every pod reached every pod (itself included) on port 2222 and got that pod's index back.
        assert rec["answers"] == {host: host.split(".")[0].rsplit("-", 1)[1] for host in rec["peers"]}, rec["answers"]
        assert sorted(rec["answers"]) == sorted(
            f"{job}-{i}.{runner.manifests.pod_spec.subdomain}.ml.svc" for i in range(workers)
        )


def test_parallelism_limits_the_running_pods(harness):
    manifests = load_manifests(harness.manifests({"*": ["ok"]}, workers=3))
    manifests.job.spec.parallelism = 1  # the chart always runs all workers at once
    with harness.runner(manifests) as runner:
        status = runner.run(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
        order = [(e.reason, e.index) for e in runner.events if e.reason in ("PodStarted", "PodSucceeded")]
    assert order == [(reason, i) for i in range(3) for reason in ("PodStarted", "PodSucceeded")]


def test_missing_config_map_is_refused_before_any_pod_starts(harness):
    text = harness.manifests({"*": ["ok"]})
    manifests = load_manifests(text)
    manifests.config_maps.clear()
    with pytest.raises(
        ConfigError, match=r"volume 'config' needs ConfigMap '\S+-config', which is not in the manifests"
    ):
        harness.runner(manifests)


def test_host_network_runs_a_one_pod_job(harness):
    text = harness.manifests({"*": ["ok"]}, workers=1)
    with harness.runner(text, network="host") as runner:
        status = runner.run(timeout=30)
        assert condition_types(status)[-1] == ("Complete", "CompletionsReached")
    (record,) = harness.records().values()
    assert record["env"]["TRAINER_NUM_WORKERS"] == "1" and tf_config_from_env(record["env"]) is None
    assert record["hostname"] == socket.gethostname()  # the machine's network and names


def test_cli_runs_the_job_and_exits_with_the_failing_code(harness, monkeypatch, capsys):
    from trainer import cli, launch

    text = harness.manifests({"0": ["exit:65"], "*": ["ok"]})
    path = harness.dir / "manifests.yaml"
    path.write_text(text)
    monkeypatch.setattr(launch, "entrypoint_command", lambda: [sys.executable, str(harness.standin)])

    code = cli.main(["job", "run", str(path), "--namespace", NAMESPACE, "--timeout", "30"])

    out = capsys.readouterr().out
    assert code == 65
    assert re.search(
        r"^job \S+: Failed \(PodFailurePolicy\): Container trainer for pod ml/\S+-0-\w{5} failed", out, re.M
    )
    assert re.search(r"^\[\S+-0-\w{5}\] step exit:65 attempt 0$", out, re.M)


# --- the real trainer ------------------------------------------------------------------------


@pytest.mark.slow
@needs_namespaces
def test_real_trainer_on_a_corrupt_manifest_fails_the_job_once_without_retries(tmp_path):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "manifest.json").write_text('{"schema_version": 1, "class_names": [')  # cut off mid-write
    text = render(
        tmp_path,
        {"workers": 2, "dataset": str(dataset), "output": str(tmp_path / "run"), "trainer": TINY_TRAINER},
    )
    with JobRunner(text, namespace=NAMESPACE, sink=Capture()) as runner:
        status = runner.run(timeout=300)
        logs = [runner.pod_log(index) for index in range(2)]

    assert condition_types(status)[-1] == ("Failed", "PodFailurePolicy")
    assert runner.exit_code == ExitCode.DATA_ERROR
    assert not [e for e in runner.events if e.reason == "PodStarted" and e.replaces]  # no retry
    assert any("manifest is not valid JSON" in log for log in logs), logs


@pytest.mark.slow
@needs_namespaces
@pytest.mark.timeout(600)
def test_the_gke_example_values_run_to_complete_with_trainer_job_run(tmp_path):
    """Issue 18's acceptance: docs/examples/gke-l4.yaml (Kueue, monitoring, Workload Identity,
    staging on) rendered by the chart, with 2 CPU workers and local paths, completes."""
    from tests.support.training import make_tiny_dataset

    gke = yaml.safe_load((ROOT / "docs" / "examples" / "gke-l4.yaml").read_text())
    trainer = {**TINY_TRAINER, "data": {**TINY_TRAINER["data"], **gke["trainer"]["data"]}}
    output = tmp_path / "run"
    values = {**gke, "workers": 2, "gpusPerWorker": 0, "trainer": trainer}
    values |= {"dataset": make_tiny_dataset(tmp_path), "output": str(output)}
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(render(tmp_path, values))

    cmd = [sys.executable, "-m", "trainer", "job", "run", str(manifests), "-n", NAMESPACE, "--timeout", "500"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=560)

    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert re.search(r"^job \S+: Complete \(CompletionsReached\)", proc.stdout, re.M), proc.stdout[-3000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["distribution"]["workers"] == 2


@pytest.mark.parametrize("path", ["../../escaped.yaml", "/tmp/escaped.yaml", "a/../../escaped.yaml"])
def test_job_run_refuses_volume_items_outside_the_volume(harness, path):
    docs = [d for d in yaml.safe_load_all(harness.manifests({"*": ["ok"]})) if d]
    job = next(d for d in docs if d["kind"] == "Job")
    config = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    config["configMap"]["items"] = [{"key": "config.yaml", "path": path}]
    manifests = harness.dir / "manifests.yaml"
    manifests.write_text(yaml.safe_dump_all(docs))

    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "job", "run", str(manifests), "-n", NAMESPACE, "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == ExitCode.CONFIG_ERROR, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"path {path!r} is absolute or contains '..'; give a relative path inside the volume" in line
    assert "volume item 'config.yaml' of ConfigMap" in line
    assert not list(harness.dir.parent.glob("**/escaped.yaml")) and not os.path.exists("/tmp/escaped.yaml")


# --- helm test: trainer doctor in the chart's test pod -------------------------------------------


def _job_test(tmp_path, values: dict) -> subprocess.CompletedProcess:
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(render(tmp_path, values))
    cmd = [sys.executable, "-m", "trainer", "job", "test", str(manifests), "-n", NAMESPACE, "--timeout", "120"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@needs_namespaces
def test_the_helm_test_pod_runs_trainer_doctor_against_a_good_configuration(tmp_path):
    from tests.support.training import make_tiny_dataset

    output = tmp_path / "run"
    values = {"workers": 2, "dataset": make_tiny_dataset(tmp_path), "output": str(output), "trainer": TINY_TRAINER}

    proc = _job_test(tmp_path, values)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\] ok   manifest .*manifest.json readable: 3 classes", proc.stdout), proc.stdout[-3000:]
    assert re.search(rf"\] ok   output   {re.escape(str(output))}: a probe object was written", proc.stdout)
    assert re.search(r"\] ok   dns      2 worker name\(s\) resolve: flowers-vgg-trainer-\w+-0\.", proc.stdout)
    assert re.search(r"\] skip gpus     no GPU asked for", proc.stdout)
    assert re.search(r"\] skip weights  model.weights=none", proc.stdout)
    assert re.search(r"^test pod flowers-vgg-trainer-doctor: passed$", proc.stdout, re.M)
    assert not list(output.glob(".doctor-probe-*"))  # the probe was deleted


@needs_namespaces
def test_the_helm_test_pod_fails_a_broken_configuration_with_the_trainers_exit_code(tmp_path):
    (tmp_path / "empty").mkdir()
    weights = {**TINY_TRAINER, "model": {**TINY_TRAINER["model"], "weights": str(tmp_path / "missing.h5")}}
    values = {"workers": 2, "dataset": str(tmp_path / "empty"), "output": str(tmp_path / "run"), "trainer": weights}

    proc = _job_test(tmp_path, values)

    assert proc.returncode == ExitCode.DATA_ERROR, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\] FAIL manifest no manifest.json in .*; run `trainer prepare SOURCE", proc.stdout)
    assert re.search(r"\] FAIL weights  model.weights .*missing.h5 does not exist; fix the path", proc.stdout)
    assert re.search(r"\] ok   output ", proc.stdout)  # the other checks still ran
    assert re.search(r"^test pod flowers-vgg-trainer-doctor: failed", proc.stdout, re.M)
