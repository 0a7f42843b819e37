"""A real Prometheus scraping a real 2-worker training run, the way the chart's PodMonitor would.

One module-scoped run feeds every test: Prometheus (Debian's 2.42, on loopback, scraping every
second, with the chart's alert rules loaded) scrapes both workers through the PodMonitor's
relabelings, the real Pushgateway the chief pushes its outcome to, and a DCGM exporter's output
(served from a sample file: this machine has no GPU).

Rule for "returns data": every dashboard query must return series at a moment in the middle of
the run or after it (the pushed outcomes exist only after it), except queries that read only
metrics the trainer exports on GPUs (trainer_accelerator_memory_used_bytes). A healthy run
legitimately fires no alert, so every alert expression must be accepted by Prometheus, every
metric it reads must have series from this run, and Prometheus's own evaluation of the loaded
rules must report them healthy (no evaluation error) and none firing.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import pytest
import yaml
from observability_helpers import (
    EXTERNAL_METRICS,
    K8S_MONITORING,
    RULES_FILE,
    Pushgateway,
    alert_rules,
    dashboard_targets,
    family,
    metric_names,
    tool,
    wait_http,
)

from tests.support.training import TINY_RUN, LogSink, make_tiny_dataset, set_args
from trainer import metrics
from trainer.contract import ExitCode
from trainer.launch import free_ports, launch_local

pytestmark = pytest.mark.slow

NAMESPACE, JOB = "obs", "tiny-run"
PODS = [f"{JOB}-0-x7k2p", f"{JOB}-1-q9m4t"]
GPU_ONLY = {metrics.ACCELERATOR_MEMORY}
#: What Grafana substitutes for the dashboard's variables.
VARIABLES = {"$namespace": NAMESPACE, "$job": JOB, "$__rate_interval": "20s", "$__range": "10m"}


@dataclass
class ScrapedRun:
    prometheus: str  # base URL
    code: int
    log: str
    output: str
    middle: float  # a time while the run trained (fine-tuning, after a validation)
    end: float  # after the run, once Prometheus scraped the pushed outcome
    exposition: str  # worker 0's /metrics at `middle`
    seconds: float
    steps_seen: list[tuple[float, float]] = field(default_factory=list)

    def query(self, expr: str, at: float) -> dict:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400 = the expression does not parse
            return json.loads(err.read())

    def series(self, expr: str, at: float) -> list[dict]:
        answer = self.query(expr, at)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(self.prometheus + path, timeout=30) as response:
            return json.loads(response.read())


# --------------------------------------------------------------------------- the run


def _serve_text(text: str) -> http.server.ThreadingHTTPServer:
    """A static /metrics page (the DCGM exporter's output) on a free loopback port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _relabel_configs() -> list[dict]:
    """The scrape's relabeling: what the Prometheus Operator adds for a PodMonitor, then the chart's own."""
    docs = [d for d in yaml.safe_load_all(K8S_MONITORING.read_text()) if d]
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    operator = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    chart = [{"source_labels": r["sourceLabels"], "target_label": r["targetLabel"]} for r in endpoint["relabelings"]]
    assert chart, "the chart's PodMonitor has no relabelings"
    return operator + chart


def _prometheus_config(worker_ports: list[int], pushgateway_port: int, dcgm_port: int) -> dict:
    workers = [
        {
            "targets": [f"127.0.0.1:{port}"],
            # Discovery labels as Kubernetes service discovery sets them for an Indexed Job's pod.
            "labels": {
                "__meta_kubernetes_namespace": NAMESPACE,
                "__meta_kubernetes_pod_name": PODS[index],
                "__meta_kubernetes_pod_label_batch_kubernetes_io_job_name": JOB,
                "__meta_kubernetes_pod_annotation_batch_kubernetes_io_job_completion_index": str(index),
            },
        }
        for index, port in enumerate(worker_ports)
    ]

    def honoured(name: str, port: int) -> dict:  # exporters whose own labels must win (as honorLabels: true)
        return {"job_name": name, "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}

    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "scrape_configs": [
            {"job_name": f"{NAMESPACE}/vgg-trainer", "static_configs": workers, "relabel_configs": _relabel_configs()},
            honoured("pushgateway", pushgateway_port),
            honoured("dcgm-exporter", dcgm_port),
        ],
    }


class _Poller:
    """Reads worker 0's /metrics while the run goes: the global step over time, and one exposition."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.steps: list[tuple[float, float]] = []
        self.middle: tuple[float, str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue
            found = re.search(r"^trainer_global_step (\S+)$", text, re.M)
            if found:
                step = float(found.group(1))
                self.steps.append((time.time(), step))
                if self.middle is None and step >= 8:  # fine-tuning, after the first validation
                    self.middle = (time.time(), text)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def scraped_run(tmp_path_factory) -> ScrapedRun:
    root = tmp_path_factory.mktemp("scraped")
    dataset = make_tiny_dataset(root)
    gateway = Pushgateway(root / "pushgateway.log")
    dcgm_text = (
        (pathlib.Path(__file__).parent / "dcgm-exporter-sample.prom")
        .read_text()
        .replace("{namespace}", NAMESPACE)
        .replace("{pod0}", PODS[0])
        .replace("{pod1}", PODS[1])
    )
    dcgm = _serve_text(dcgm_text)
    worker_ports = free_ports(2)
    (prometheus_port,) = free_ports(1)
    (root / "prometheus.yml").write_text(
        yaml.safe_dump(_prometheus_config(worker_ports, gateway.port, dcgm.server_address[1]))
    )
    prometheus_log = open(root / "prometheus.log", "w")  # noqa: SIM115 - closed below
    prometheus = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=prometheus_log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{prometheus_port}"
    saved_env = {k: os.environ.get(k) for k in ("TRAINER_NAMESPACE", "TRAINER_JOB_NAME", "TRAINER_IMAGE")}
    try:
        wait_http(base + "/-/ready", proc=prometheus)
        # What the chart sets on the pods: the chief's pushed outcome is grouped by these.
        os.environ.update(TRAINER_NAMESPACE=NAMESPACE, TRAINER_JOB_NAME=JOB, TRAINER_IMAGE="vgg-trainer:test")
        poller = _Poller(worker_ports[0])
        log = LogSink()
        started = time.time()
        settings = [
            *TINY_RUN,
            f"data.dataset={dataset}",
            f"output.dir={root / 'run'}",
            f"monitoring.pushgateway_url={gateway.url}",
        ]
        code = launch_local(2, ["train", *set_args(*settings)], sink=log, metrics_ports=worker_ports)
        seconds = time.time() - started
        poller.stop()
        time.sleep(3)  # a few scrapes of the Pushgateway after the chief's push
        assert code == ExitCode.OK, log.text[-3000:]
        assert poller.middle is not None, f"worker 0's metrics never showed step 8: {poller.steps[-5:]}"
        middle, exposition = poller.middle
        yield ScrapedRun(
            base, code, log.text, str(root / "run"), middle + 2, time.time(), exposition, seconds, poller.steps
        )
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        prometheus.terminate()
        prometheus.wait(timeout=30)
        prometheus_log.close()
        dcgm.shutdown()
        gateway.stop()


# --------------------------------------------------------------------------- tests


def _substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def test_prometheus_scraped_both_workers_through_the_chart_s_relabeling(scraped_run):
    up = scraped_run.series(f'up{{job="{NAMESPACE}/vgg-trainer"}}', scraped_run.middle)
    labels = sorted((s["metric"]["worker"], s["metric"]["pod"], s["metric"]["job_name"]) for s in up)

    assert labels == [("0", PODS[0], JOB), ("1", PODS[1], JOB)]
    assert all(s["value"][1] == "1" for s in up)
    build = scraped_run.series("trainer_build_info", scraped_run.middle)
    assert {s["metric"]["image"] for s in build} == {"vgg-trainer:test"}
    assert scraped_run.series("max(trainer_workers)", scraped_run.middle)[0]["value"][1] == "2"


def test_every_dashboard_query_returns_data(scraped_run):
    empty = []
    for title, target in dashboard_targets():
        expr = _substitute(target["expr"])
        found = scraped_run.series(expr, scraped_run.middle) or scraped_run.series(expr, scraped_run.end)
        if not found and not metric_names(target["expr"]) <= GPU_ONLY:
            empty.append(f"{title}: {expr}")

    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_dashboard_values_describe_the_run(scraped_run):
    at = scraped_run.middle

    def one(expr: str) -> float:
        (sample,) = scraped_run.series(_substitute(expr), at)
        return float(sample["value"][1])

    # At least the middle's 8 of 12 steps; on a fast CPU the last 4 steps may end within the 2 s after it.
    assert 8 / 12 <= one('max(trainer_progress_ratio{namespace="$namespace", job_name=~"$job"})') <= 1
    assert one('sum(rate(trainer_images_processed_total{namespace="$namespace", job_name=~"$job"}[20s]))') > 0
    phases = scraped_run.series('max by (phase) (trainer_phase{namespace="obs"}) == 1', at)
    assert [s["metric"]["phase"] for s in phases] == ["fine_tuning"]
    pushed = scraped_run.series(f'trainer_run_success{{namespace="{NAMESPACE}", job_name="{JOB}"}}', scraped_run.end)
    assert [s["value"][1] for s in pushed] == ["1"]
    steps = scraped_run.series(f'trainer_run_global_steps{{job_name="{JOB}"}}', scraped_run.end)
    assert [s["value"][1] for s in steps] == ["12"]


def test_every_alert_expression_parses_and_reads_series_of_the_run(scraped_run):
    for rule in alert_rules():
        answer = scraped_run.query(rule["expr"], scraped_run.middle)
        assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"
        for name in metric_names(rule["expr"]):
            found = scraped_run.series(f'count({name}{{namespace="{NAMESPACE}"}})', scraped_run.middle)
            assert found, f"{rule['alert']} reads {name}, which the run did not export"


def test_prometheus_evaluated_the_loaded_rules_without_errors_and_nothing_fires(scraped_run):
    groups = scraped_run.api("/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    firing = [a for a in scraped_run.api("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]

    assert [r["name"] for r in rules] == [r["alert"] for r in alert_rules()]
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
        assert rule["lastEvaluation"] > "2000"  # evaluated (RFC 3339 time), not just loaded
    assert firing == []


def test_promtool_check_metrics_is_clean_on_a_worker_s_exposition(scraped_run):
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=scraped_run.exposition, capture_output=True, text=True
    )

    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )
    assert "trainer_step_duration_seconds_bucket" in scraped_run.exposition


def test_every_metric_the_dashboard_and_alerts_use_is_exported_and_scraped(scraped_run):
    used = {family(n) for _, t in dashboard_targets() for n in metric_names(t["expr"])}
    used |= {family(n) for rule in alert_rules() for n in metric_names(rule["expr"])}
    scraped = set(scraped_run.api("/api/v1/label/__name__/values")["data"])
    scraped_families = {family(n) for n in scraped}

    assert used - EXTERNAL_METRICS <= {family(n) for n in metrics.SERVED + metrics.PUSHED}
    missing = {n for n in used - GPU_ONLY if family(n) not in scraped_families}
    assert not missing, f"used but never scraped: {missing}"


def test_the_chief_drew_the_training_curves(scraped_run):
    from PIL import Image

    path = os.path.join(scraped_run.output, "training-curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 800
    assert f"training curves written to {path}" in scraped_run.log


def test_the_workers_were_scraped_to_the_last_step(scraped_run):
    # The whole module's cost is this run: keep it small (2 cores, shared). Its time is a figure, not a limit.
    print(f"\nfigures: the scraped 2-worker run took {scraped_run.seconds:.0f} s")
    assert max(step for _, step in scraped_run.steps_seen) >= 11
