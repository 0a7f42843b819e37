"""The trainer's Prometheus metrics: every name in one place, an endpoint, and the Pushgateway.

Every worker serves its metrics on ``contract.METRICS_PORT`` (the chart's port). The CLI
starts the endpoint before TensorFlow is imported, so a worker that hangs at start-up (waiting
for peers, loading the runtime) is already visible and its ``trainer_build_info`` answers.

Naming follows Prometheus conventions: base units (seconds, bytes), ``_total`` for counters,
ratios between 0 and 1. Labels are bounded: ``phase`` (2 values), ``split`` (train, validation,
test), ``device`` (the accelerators of one worker). The worker index, the Kubernetes Job and the
pod are *target* labels, attached by the scrape (the chart's PodMonitor/ServiceMonitor relabel
them from the pod), never exported here; nothing depends on step or epoch numbers as labels.

This module imports no TensorFlow. ``TrainerMetrics(registry=...)`` takes a registry so tests
read values with ``registry.get_sample_value``; ``process_metrics()`` is the process's own.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import math
import os
import platform
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from importlib import metadata

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from trainer.contract import HEALTH_PATH, METRIC_PREFIX, METRICS_PORT, Env
from trainer.redact import has_credentials, redact_url

log = logging.getLogger(__name__)

# `_created` series double the series count and no dashboard or rule needs them.
prometheus_client.disable_created_metrics()

P = METRIC_PREFIX

# --------------------------------------------------------------------------- names
# Exposition names (what Prometheus stores; counters carry their `_total`). The dashboard, the
# alert rules and the docs are checked against these by tests/observability.

BUILD_INFO = P + "build_info"
WORKERS = P + "workers"
REPLICAS = P + "replicas"
PHASE = P + "phase"
EPOCH = P + "epoch"
GLOBAL_STEP = P + "global_step"
PROGRESS_RATIO = P + "progress_ratio"
ETA_SECONDS = P + "eta_seconds"
IMAGES_PROCESSED = P + "images_processed_total"
STEP_DURATION = P + "step_duration_seconds"
STEP_COMPUTE = P + "step_compute_seconds"
INPUT_WAIT = P + "input_wait_seconds_total"
STORAGE_READ_BYTES = P + "storage_read_bytes_total"
LOSS = P + "loss"
ACCURACY = P + "accuracy"
LEARNING_RATE = P + "learning_rate"
BACKUP_DURATION = P + "backup_duration_seconds"
BACKUP_LAST_SUCCESS = P + "backup_last_success_timestamp_seconds"
BACKUP_FAILURES = P + "backup_failures_total"
RESTORES = P + "restores_total"
GROUP_RESTARTS = P + "group_restarts"
ACCELERATOR_MEMORY = P + "accelerator_memory_used_bytes"

# Pushed to the Pushgateway by the chief when a run ends (not served by the workers).
RUN_SUCCESS = P + "run_success"
RUN_EXIT_CODE = P + "run_exit_code"
RUN_FINISHED = P + "run_finished_timestamp_seconds"
RUN_DURATION = P + "run_duration_seconds"
RUN_GLOBAL_STEPS = P + "run_global_steps"
RUN_FINAL_ACCURACY = P + "run_final_accuracy"
RUN_FINAL_LOSS = P + "run_final_loss"

#: Every name a worker serves, and every name the chief pushes (the docs list them all).
SERVED = (
    BUILD_INFO, WORKERS, REPLICAS, PHASE, EPOCH, GLOBAL_STEP, PROGRESS_RATIO, ETA_SECONDS, IMAGES_PROCESSED,
    STEP_DURATION, STEP_COMPUTE, INPUT_WAIT, STORAGE_READ_BYTES, LOSS, ACCURACY, LEARNING_RATE, BACKUP_DURATION,
    BACKUP_LAST_SUCCESS, BACKUP_FAILURES, RESTORES, GROUP_RESTARTS, ACCELERATOR_MEMORY,
)  # fmt: skip
PUSHED = (RUN_SUCCESS, RUN_EXIT_CODE, RUN_FINISHED, RUN_DURATION, RUN_GLOBAL_STEPS, RUN_FINAL_ACCURACY, RUN_FINAL_LOSS)

#: Step-time buckets: from 10 ms (small models on GPUs) to 5 minutes (huge batches on CPUs).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Backup-time buckets: local disk in under a second to many GB on object storage in minutes.
BACKUP_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

PHASES = ("feature_extraction", "fine_tuning")
SPLITS = ("train", "validation", "test")


def _family(name: str) -> str:
    """prometheus_client wants counter names without `_total` and info names without `_info`."""
    return name.removesuffix("_total").removesuffix("_info")


class TrainerMetrics:
    """The metrics one worker exports, registered on ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.build_info = Info(_family(BUILD_INFO), "Versions and container image of the trainer.", registry=r)
        self.workers = Gauge(WORKERS, "Worker processes in the training cluster.", registry=r)
        self.replicas = Gauge(REPLICAS, "Replicas training in sync over all workers.", registry=r)
        self.phase = Gauge(PHASE, "1 for the phase running now, 0 for the others.", ["phase"], registry=r)
        self.epoch = Gauge(EPOCH, "Epoch running now, counted from 1 within its phase.", registry=r)
        self.global_step = Gauge(GLOBAL_STEP, "Training steps completed by the run, both phases.", registry=r)
        self.progress = Gauge(PROGRESS_RATIO, "Completed share of the run's planned steps (0-1).", registry=r)
        self.eta = Gauge(ETA_SECONDS, "Estimated seconds of training left (steps left x recent pace).", registry=r)
        self.images = Counter(
            _family(IMAGES_PROCESSED), "Training images this worker's replicas processed.", registry=r
        )
        self.step_duration = Histogram(
            STEP_DURATION, "Wall time of a training step (equal on all workers: steps are synchronous).",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_compute = Histogram(
            STEP_COMPUTE,
            "Time from this worker's batch arriving to its gradients being ready (no input or all-reduce wait).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.input_wait = Counter(
            _family(INPUT_WAIT), "Time training steps waited for this worker's input pipeline.", registry=r
        )
        self.storage_read = Counter(
            _family(STORAGE_READ_BYTES), "Bytes of training records (TFRecord framing included) read.", registry=r
        )
        self.loss = Gauge(LOSS, "Loss: train = running mean of the epoch; others at evaluation.", ["split"], registry=r)
        self.accuracy = Gauge(ACCURACY, "Accuracy (0-1), as the loss.", ["split"], registry=r)
        self.learning_rate = Gauge(LEARNING_RATE, "Learning rate of the current step.", registry=r)
        self.backup_duration = Histogram(
            BACKUP_DURATION, "Time to write a resumable backup.", buckets=BACKUP_BUCKETS, registry=r
        )
        self.backup_last_success = Gauge(
            BACKUP_LAST_SUCCESS, "Unix time the last backup was written completely.", registry=r
        )
        self.backup_failures = Counter(_family(BACKUP_FAILURES), "Backups that failed with an error.", registry=r)
        self.restores = Counter(_family(RESTORES), "Phases this process resumed from a mid-phase backup.", registry=r)
        self.group_restarts = Gauge(
            GROUP_RESTARTS, "Times this run was started again after its first start (from its output).", registry=r
        )
        self.accelerator_memory = Gauge(
            ACCELERATOR_MEMORY, "Accelerator memory TensorFlow holds now (GPUs only).", ["device"], registry=r
        )

    # ----------------------------------------------------------------- updates

    def set_build(self, image: str) -> None:
        self.build_info.info(
            {
                "version": _version("vgg-trainer"),
                "tensorflow": _version("tensorflow") or _version("tensorflow-cpu"),
                "tf_keras": _version("tf-keras"),
                "python": platform.python_version(),
                "image": image,
            }
        )

    def set_phase(self, name: str) -> None:
        for phase in PHASES:
            self.phase.labels(phase=phase).set(1 if phase == name else 0)

    def set_evaluation(self, split: str, logs: dict[str, float]) -> None:
        if "loss" in logs:
            self.loss.labels(split=split).set(float(logs["loss"]))
        if "accuracy" in logs:
            self.accuracy.labels(split=split).set(float(logs["accuracy"]))

    def names(self) -> set[str]:
        """Exposition names of every sample family this registry exports (histogram `_bucket` etc. folded)."""
        names = set()
        for family in self.registry.collect():
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
        return names


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


# --------------------------------------------------------------------------- the process's endpoint

_process: TrainerMetrics | None = None
_lock = threading.Lock()


def process_metrics() -> TrainerMetrics:
    """This process's metrics (created on first use, with the process and GC collectors)."""
    global _process
    with _lock:
        if _process is None:
            registry = CollectorRegistry()
            prometheus_client.ProcessCollector(registry=registry)
            prometheus_client.PlatformCollector(registry=registry)
            prometheus_client.GCCollector(registry=registry)
            _process = TrainerMetrics(registry)
            _process.set_build(os.environ.get(Env.IMAGE.value, ""))
    return _process


def metrics_port(configured: int, environ: dict[str, str] | os._Environ = os.environ) -> int:
    """The endpoint's port: $TRAINER_METRICS_PORT (the local launcher's choice per worker) wins."""
    text = environ.get(Env.METRICS_PORT.value, "").strip()
    if not text:
        return configured
    try:
        port = int(text)
    except ValueError:
        port = -2
    if not 0 <= port <= 65535:
        from trainer.errors import ConfigError

        raise ConfigError(f"${Env.METRICS_PORT.value}={text!r}: expected a port number 0-65535 (0 = any free port)")
    return port


#: How long one rendering of /metrics is reused. Rendering costs ~1.5 ms of CPU (in the
#: training process, under its GIL); reusing it keeps the endpoint's cost flat however many
#: scrapers ask (Prometheus replicas, dashboards, curl) at the price of values up to this old.
EXPOSITION_MAX_AGE_SECONDS = 0.5


class _Exposition:
    """The registry's text exposition, rendered at most once per ``max_age`` seconds."""

    def __init__(self, registry: CollectorRegistry, max_age: float = EXPOSITION_MAX_AGE_SECONDS):
        self.registry, self.max_age = registry, max_age
        self._lock = threading.Lock()
        self._body, self._rendered = b"", -math.inf

    def body(self) -> bytes:
        with self._lock:
            now = time.monotonic()
            if now - self._rendered >= self.max_age:
                self._body, self._rendered = prometheus_client.generate_latest(self.registry), now
            return self._body


#: Connections the endpoint serves at once, one thread each (Prometheus keeps one per scraper).
#: When all are taken, a new connection closes the one that has waited longest for its request
#: (an idle keep-alive or a slow client), so the liveness probe is answered whoever holds the rest.
MAX_CONNECTIONS = 16
#: Seconds a connection may wait for its next complete request (idle keep-alive, or a client sending
#: its request slowly) or take to accept a response's bytes before it is closed.
IDLE_TIMEOUT_SECONDS = 60.0


def _handler(exposition: _Exposition) -> type[http.server.BaseHTTPRequestHandler]:
    class MetricsHandler(http.server.BaseHTTPRequestHandler):
        # Keep-alive, as Prometheus scrapes: one connection (and thread) per scraper, not per scrape.
        protocol_version = "HTTP/1.1"

        def setup(self):
            self.timeout = self.server.idle_timeout  # every socket read and write; the server bounds the total
            super().setup()

        def handle_one_request(self):
            self.server.waiting(self.connection)  # evictable until its request has arrived whole
            super().handle_one_request()

        def do_GET(self):
            self.server.busy(self.connection)
            if self.path.split("?", 1)[0] == HEALTH_PATH:
                # Answered by this thread, so it fails only when no Python thread can run: the
                # process stopped, or its main thread in a C call that holds the GIL. A Python
                # busy loop (the GIL is handed over every 5 ms) and C code that released it
                # (TensorFlow ops and collectives, even deadlocked) still get an answer: the
                # collective timeout bounds those (measured: tests/jobrunner/test_liveness.py).
                self._send(b"ok\n", "text/plain; charset=utf-8")
                return
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics here")
                return
            self._send(exposition.body(), prometheus_client.CONTENT_TYPE_LATEST)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape would drown the training log
            pass

    return MetricsHandler


class _MetricsServer(http.server.ThreadingHTTPServer):
    """The endpoint's HTTP server: at most ``max_connections`` threads, none held for ever.

    A connection is *waiting* from its start, and after each response, until its next request has
    arrived whole; then it is *busy* until the response is written. The accept loop closes waiting
    connections older than ``idle_timeout`` (slow clients, abandoned keep-alives) and, when every
    slot is taken, the oldest waiting one to make room: a new connection, like the kubelet's
    liveness probe, is served however many slow clients there are. Clients that go away are not
    the trainer's problem and are not logged (socketserver would print a traceback each).

    An IPv6 address ("::") also takes IPv4 clients (dual stack).
    """

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of connections queues instead of being dropped
    #: How long a new connection waits for a slot freed by an eviction before it is closed.
    SLOT_WAIT_SECONDS = 1.0

    def __init__(self, address, handler, max_connections: int, idle_timeout: float):
        self.max_connections, self.idle_timeout = max_connections, idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, float] = {}  # connection -> when it began to wait
        self._open: set[socket.socket] = set()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            with contextlib.suppress(OSError):  # "::" answers IPv4 clients too, where the kernel allows it
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    # ----------------------------------------------------------------- connection states

    def waiting(self, connection: socket.socket) -> None:
        with self._lock:
            self._waiting[connection] = time.monotonic()

    def busy(self, connection: socket.socket) -> None:
        with self._lock:
            self._waiting.pop(connection, None)

    def _close(self, connections) -> None:
        for connection in connections:
            with contextlib.suppress(OSError):  # wakes its thread: its read returns end-of-stream
                connection.shutdown(socket.SHUT_RDWR)

    def _evict(self, older_than: float | None = None) -> None:
        """Close the waiting connections that began to wait before ``older_than``, or else the oldest one."""
        with self._lock:
            by_age = sorted(self._waiting, key=self._waiting.__getitem__)
            victims = by_age[:1] if older_than is None else [c for c in by_age if self._waiting[c] < older_than]
            for connection in victims:
                del self._waiting[connection]
        self._close(victims)

    # ----------------------------------------------------------------- socketserver hooks

    def service_actions(self) -> None:  # the accept loop, at least every poll interval (0.5 s)
        self._evict(older_than=time.monotonic() - self.idle_timeout)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict()
            if not self._slots.acquire(timeout=self.SLOT_WAIT_SECONDS):  # every connection busy answering
                self.shutdown_request(request)
                return
        with self._lock:
            self._open.add(request)
            self._waiting[request] = time.monotonic()  # evictable before its thread even runs
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._finished(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._finished(request)

    def _finished(self, request) -> None:
        with self._lock:
            self._waiting.pop(request, None)
            self._open.discard(request)
        self._slots.release()

    def handle_error(self, request, client_address) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):  # reset, broken pipe, timeout: the client went away or stalled
            return
        log.warning("metrics endpoint: a request from %s failed: %s", client_address[0], _one_line(err))

    def server_close(self) -> None:
        super().server_close()
        with self._lock:
            connections = list(self._open)
        self._close(connections)


def _server_class(address: str) -> type[_MetricsServer]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return type("MetricsServer", (_MetricsServer,), {"address_family": family})


@dataclass
class Endpoint:
    port: int
    server: http.server.ThreadingHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(
    metrics: TrainerMetrics,
    port: int = METRICS_PORT,
    address: str = "",
    max_age: float = EXPOSITION_MAX_AGE_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
    idle_timeout: float = IDLE_TIMEOUT_SECONDS,
) -> Endpoint | None:
    """Serve ``metrics`` on ``address:port`` (0 = a free port) in a daemon thread.

    At most ``max_connections`` connections (threads) at once; see :class:`_MetricsServer`.
    A port already taken (only possible outside Kubernetes, where each pod has its own) is a
    warning, not an error: training matters more than its metrics.
    """
    handler = _handler(_Exposition(metrics.registry, max_age))
    address = address or "0.0.0.0"
    try:
        server = _server_class(address)((address, port), handler, max_connections, idle_timeout)
    except OSError as err:
        log.warning(
            "metrics endpoint not started: cannot listen on port %d (%s); set monitoring.port "
            "(or $%s) to a free port, or monitoring.enabled=false",
            port,
            err.strerror or err,
            Env.METRICS_PORT.value,
        )
        return None
    thread = threading.Thread(target=server.serve_forever, name="metrics-endpoint", daemon=True)
    thread.start()
    actual = server.server_port
    log.info("metrics on http://%s:%d/metrics", f"[{address}]" if ":" in address else address, actual)
    return Endpoint(actual, server, thread)


# --------------------------------------------------------------------------- Pushgateway


@dataclass
class Outcome:
    """How a run ended, as the chief pushes it."""

    exit_code: int
    started: float  # time.time() at start
    global_steps: int = 0
    evaluation: dict[str, dict[str, float]] | None = None


def outcome_registry(outcome: Outcome, finished: float | None = None) -> CollectorRegistry:
    r = CollectorRegistry()
    finished = time.time() if finished is None else finished
    Gauge(RUN_SUCCESS, "1 when the run completed, 0 when it failed or was stopped.", registry=r).set(
        1 if outcome.exit_code == 0 else 0
    )
    Gauge(RUN_EXIT_CODE, "Exit code of the chief (trainer.contract.ExitCode).", registry=r).set(outcome.exit_code)
    Gauge(RUN_FINISHED, "Unix time the run (this attempt) ended.", registry=r).set(finished)
    Gauge(RUN_DURATION, "Seconds this attempt of the run took.", registry=r).set(max(finished - outcome.started, 0))
    Gauge(RUN_GLOBAL_STEPS, "Training steps the run completed.", registry=r).set(outcome.global_steps)
    accuracy = Gauge(RUN_FINAL_ACCURACY, "Final accuracy per evaluated split.", ["split"], registry=r)
    loss = Gauge(RUN_FINAL_LOSS, "Final loss per evaluated split.", ["split"], registry=r)
    for split, values in (outcome.evaluation or {}).items():
        if "accuracy" in values:
            accuracy.labels(split=split).set(values["accuracy"])
        if "loss" in values:
            loss.labels(split=split).set(values["loss"])
    return r


def grouping_key(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """Which run a pushed outcome belongs to: the pod's namespace and Kubernetes Job name."""
    return {
        "namespace": environ.get(Env.NAMESPACE.value) or "local",
        "job_name": environ.get(Env.JOB_NAME.value) or "local",
    }


def pushgateway_url(configured: str, environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The Pushgateway to push to: $TRAINER_PUSHGATEWAY_URL (the chart's Secret) wins over the configuration."""
    return environ.get(Env.PUSHGATEWAY_URL.value, "").strip() or configured


def push_outcome(url: str, job: str, outcome: Outcome, environ=os.environ, timeout: float = 10.0) -> bool:
    """Push the outcome to the Pushgateway at ``url`` (replacing the run's group); never raises.

    Credentials in the URL (``https://user:password@host``) go as HTTP basic auth, never in logs.
    A failed push must not turn a finished run into a failed one: it is logged and reported.
    """
    handler = prometheus_client.exposition.default_handler
    if has_credentials(url):
        parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
        user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")

        def handler(url, method, timeout, headers, data):
            return prometheus_client.exposition.basic_auth_handler(
                url, method, timeout, headers, data, username=user, password=password
            )

    try:
        prometheus_client.push_to_gateway(
            redact_url(url),
            job=job,
            registry=outcome_registry(outcome),
            grouping_key=grouping_key(environ),
            timeout=timeout,
            handler=handler,
        )
    except Exception as err:  # network errors, HTTP errors, bad URLs: all just a warning
        log.warning("could not push the run outcome to %s: %s", redact_url(url), _one_line(err))
        return False
    log.info("run outcome pushed to %s (job=%s, %s)", redact_url(url), job, grouping_key(environ))
    return True


def _one_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200] or type(err).__name__
