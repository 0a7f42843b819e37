"""trainer.metrics and trainer.train.telemetry with injected registries: every update, the
endpoint, the attempt count, the Pushgateway (the real one) and the training-curves PNG."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from observability_helpers import Pushgateway

from trainer import metrics
from trainer.contract import HEALTH_PATH, Env
from trainer.errors import ConfigError
from trainer.metrics import TrainerMetrics


def value(m: TrainerMetrics, name: str, **labels) -> float | None:
    return m.registry.get_sample_value(name, labels)


# --------------------------------------------------------------------------- names


def test_every_served_metric_is_named_in_the_module_and_follows_the_conventions():
    m = TrainerMetrics()
    served = m.names()

    assert served == set(metrics.SERVED)
    assert len(metrics.SERVED) == len(set(metrics.SERVED))
    for name in served:
        assert name.startswith("trainer_")
        assert name.endswith(("_total", "_seconds", "_bytes", "_ratio", "_info")) or name in {
            metrics.WORKERS, metrics.REPLICAS, metrics.PHASE, metrics.EPOCH, metrics.GLOBAL_STEP,
            metrics.LOSS, metrics.ACCURACY, metrics.LEARNING_RATE, metrics.GROUP_RESTARTS,
        }  # fmt: skip
    pushed = {family.name for family in metrics.outcome_registry(metrics.Outcome(0, time.time())).collect()}
    assert pushed == set(metrics.PUSHED)


def test_build_info_reports_versions_and_the_image(monkeypatch):
    m = TrainerMetrics()
    m.set_build("europe-docker.pkg.dev/p/ml/vgg-trainer:1.2.3")

    (sample,) = [s for f in m.registry.collect() if f.name == "trainer_build" for s in f.samples]
    assert sample.name == metrics.BUILD_INFO and sample.value == 1
    assert sample.labels["image"] == "europe-docker.pkg.dev/p/ml/vgg-trainer:1.2.3"
    assert sample.labels["tensorflow"].startswith("2.") and sample.labels["tf_keras"].startswith("2.")
    assert sample.labels["version"] and sample.labels["python"].count(".") == 2


def test_phase_is_one_for_the_running_phase_only():
    m = TrainerMetrics()
    m.set_phase("fine_tuning")

    assert value(m, metrics.PHASE, phase="fine_tuning") == 1
    assert value(m, metrics.PHASE, phase="feature_extraction") == 0


# --------------------------------------------------------------------------- the endpoint


def test_metrics_port_from_the_environment_wins_and_is_checked():
    assert metrics.metrics_port(9090, {}) == 9090
    assert metrics.metrics_port(9090, {Env.METRICS_PORT.value: "9311"}) == 9311
    assert metrics.metrics_port(9090, {Env.METRICS_PORT.value: "0"}) == 0
    for bad in ("http", "70000", "-1"):
        with pytest.raises(ConfigError, match=r"TRAINER_METRICS_PORT=.*expected a port number 0-65535"):
            metrics.metrics_port(9090, {Env.METRICS_PORT.value: bad})


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_endpoint_renders_at_most_once_per_max_age_and_serves_only_metrics():
    m = TrainerMetrics()
    endpoint = metrics.serve(m, port=0, address="127.0.0.1", max_age=0.3)
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        m.global_step.set(1)
        first = _get(url)
        m.global_step.set(2)
        cached = _get(url)  # within max_age: the same rendering
        time.sleep(0.35)
        fresh = _get(url)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(f"http://127.0.0.1:{endpoint.port}/other")
        health = _get(f"http://127.0.0.1:{endpoint.port}{HEALTH_PATH}")  # the chart's liveness probe
    finally:
        endpoint.close()

    assert health == "ok\n"

    assert "trainer_global_step 1.0" in first and cached == first
    assert "trainer_global_step 2.0" in fresh


def test_endpoint_serves_the_registry_and_a_taken_port_is_only_a_warning(caplog):
    m = TrainerMetrics()
    m.global_step.set(42)
    endpoint = metrics.serve(m, port=0, address="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as response:
            text = response.read().decode()
        with caplog.at_level(logging.WARNING):
            second = metrics.serve(TrainerMetrics(), port=endpoint.port, address="127.0.0.1")
    finally:
        endpoint.close()

    assert "trainer_global_step 42.0" in text
    assert "_created" not in text  # created series are switched off
    assert second is None
    assert f"cannot listen on port {endpoint.port}" in caplog.text and "TRAINER_METRICS_PORT" in caplog.text


def test_the_ipv6_any_address_answers_ipv4_and_ipv6_clients():
    """monitoring.address "::" (the chart's choice for IPv6 clusters) listens on both stacks."""
    endpoint = metrics.serve(TrainerMetrics(), port=0, address="::")
    assert endpoint is not None, "the endpoint did not start on ::"
    try:
        ipv4 = _get(f"http://127.0.0.1:{endpoint.port}{HEALTH_PATH}")
        ipv6 = _get(f"http://[::1]:{endpoint.port}{HEALTH_PATH}")
    finally:
        endpoint.close()

    assert ipv4 == ipv6 == "ok\n"


def _slow_client(port: int) -> socket.socket:
    """A connection that starts a request and never finishes it (a slowloris, or a stuck scraper)."""
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n")  # no blank line: the head never ends
    return client


def _closed_by_the_server(client: socket.socket, timeout: float) -> bool:
    client.settimeout(timeout)
    try:
        return client.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


@pytest.mark.timeout(60)
def test_slow_clients_hold_a_bounded_number_of_threads_and_the_probe_is_answered_meanwhile():
    endpoint = metrics.serve(TrainerMetrics(), port=0, address="127.0.0.1")
    before = threading.active_count()
    slow, peak = [], 0
    try:
        for _ in range(3 * metrics.MAX_CONNECTIONS):
            slow.append(_slow_client(endpoint.port))
            peak = max(peak, threading.active_count() - before)
        time.sleep(0.5)  # the accept loop has taken them all
        peak = max(peak, threading.active_count() - before)
        started = time.monotonic()
        health = [_get(f"http://127.0.0.1:{endpoint.port}{HEALTH_PATH}") for _ in range(3)]  # the liveness probe
        seconds = time.monotonic() - started
        evicted = sum(_closed_by_the_server(c, 0.5) for c in slow[: 2 * metrics.MAX_CONNECTIONS])
        held = sum(not _closed_by_the_server(c, 0.1) for c in slow[-metrics.MAX_CONNECTIONS + 3 :])
    finally:
        for client in slow:
            client.close()
        endpoint.close()

    assert peak <= metrics.MAX_CONNECTIONS, f"{peak} threads for {len(slow)} slow clients"
    assert health == ["ok\n"] * 3 and seconds < 3  # while the slow clients hold every slot
    assert evicted == 2 * metrics.MAX_CONNECTIONS  # the oldest waiting ones made room
    assert held == metrics.MAX_CONNECTIONS - 3  # the newest still held, until their idle timeout


@pytest.mark.timeout(60)
def test_a_client_that_never_finishes_its_request_is_closed_after_the_idle_timeout():
    endpoint = metrics.serve(TrainerMetrics(), port=0, address="127.0.0.1", idle_timeout=0.5)
    before = threading.active_count()
    try:
        slow = [_slow_client(endpoint.port) for _ in range(4)]
        closed = [_closed_by_the_server(c, 5.0) for c in slow]
        time.sleep(0.2)  # their threads end
        threads = threading.active_count() - before
        health = _get(f"http://127.0.0.1:{endpoint.port}{HEALTH_PATH}")
    finally:
        for client in slow:
            client.close()
        endpoint.close()

    assert closed == [True] * 4
    assert threads <= 0  # none left for the slow clients (another test's thread may end meanwhile)
    assert health == "ok\n"


#: A worker process serving a large exposition (a few MB: a response takes many writes).
_BIG_ENDPOINT = """
import logging, sys
from prometheus_client import Gauge
from trainer import metrics
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
m = metrics.TrainerMetrics()
padding = Gauge("test_padding", "Series that make the exposition large.", ["series"], registry=m.registry)
for i in range(100_000):
    padding.labels(series=f"s{i:06d}").set(i)
endpoint = metrics.serve(m, port=0, address="127.0.0.1", max_age=60)
print(endpoint.port, flush=True)
sys.stdin.read()
endpoint.close()
"""


@pytest.mark.timeout(120)
def test_clients_that_disconnect_mid_response_leave_no_traceback_in_the_log():
    import struct
    import subprocess
    import sys

    worker = subprocess.Popen(
        [sys.executable, "-c", _BIG_ENDPOINT],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = int(worker.stdout.readline())
        body = _get(f"http://127.0.0.1:{port}/metrics")  # renders (and caches) the exposition
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: worker\r\n\r\n")
            assert client.recv(65536)  # the response is on its way ...
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()  # ... and the client resets the connection
        time.sleep(0.5)
        health = _get(f"http://127.0.0.1:{port}{HEALTH_PATH}")
    finally:
        _, stderr = worker.communicate(timeout=30)

    assert len(body) > 3_000_000
    assert health == "ok\n"
    assert worker.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "Exception occurred" not in stderr, stderr[-3000:]
    assert "metrics endpoint:" not in stderr  # not even one line per disconnect


# --------------------------------------------------------------------------- group restarts


def test_attempts_are_counted_by_the_chief_and_read_by_the_others(tmp_path):
    from trainer.train.telemetry import count_attempt

    path = str(tmp_path / "attempts.json")

    assert count_attempt(path, is_chief=False) == 1  # nothing recorded yet
    assert count_attempt(path, is_chief=True) == 1
    assert count_attempt(path, is_chief=True) == 2
    assert count_attempt(path, is_chief=False) == 2
    assert json.loads((tmp_path / "attempts.json").read_text()) == {"attempts": 2}
    (tmp_path / "attempts.json").write_text("{broken")
    assert count_attempt(path, is_chief=True) == 1


# --------------------------------------------------------------------------- the telemetry callback


class StopAtStep(__import__("tf_keras").callbacks.Callback):
    """Simulates a crash after ``steps`` steps (a restart then restores the backup)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise RuntimeError("simulated crash")


def _slow_records(batch: int, delay: float):
    """A tf.data pipeline yielding (images, labels, record_bytes) batches, ``delay`` s per batch."""
    import tensorflow as tf

    def generate():
        rng = np.random.default_rng(0)
        while True:
            time.sleep(delay)
            x = rng.normal(size=(batch, 4)).astype("float32")
            yield x, np.eye(2, dtype="float32")[rng.integers(0, 2, batch)], np.full(batch, 100, dtype="int64")

    spec = (
        tf.TensorSpec((batch, 4), tf.float32),
        tf.TensorSpec((batch, 2), tf.float32),
        tf.TensorSpec((batch,), tf.int64),
    )
    return tf.data.Dataset.from_generator(generate, output_signature=spec)


def _fit(m: TrainerMetrics, backup_dir: str, extra_callbacks=(), delay: float = 0.15, xla: bool = False):
    import tensorflow as tf
    import tf_keras as keras

    from trainer.model import Classifier
    from trainer.train.backup import PhaseBackup
    from trainer.train.callbacks import Backups
    from trainer.train.phases import fit_from_position
    from trainer.train.telemetry import RunTelemetry

    inputs = keras.Input((4,))
    model = Classifier(inputs, keras.layers.Dense(2, activation="softmax")(inputs))  # the trainer's training step
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy", metrics=["accuracy"])
    model.compile_compute = xla  # runtime.jit_compile
    run = RunTelemetry(m, num_workers=1, local_replicas=1, total_steps=6)
    data = run.probe.stamp_dataset(_slow_records(8, delay))
    validation = tf.data.Dataset.from_tensor_slices(
        (np.zeros((8, 4), "float32"), np.eye(2, dtype="float32")[[0, 1] * 4])
    ).batch(8)
    plan = SimpleNamespace(name="feature_extraction", first_global_step=0, global_batch=8)
    callbacks = [*extra_callbacks]
    backup = PhaseBackup(backup_dir, model, keep=2, is_chief=True)
    position = backup.restore()  # as trainer.train.phases.run_phase does
    resumed = position.phase_steps if position else 0
    run.instrument(callbacks, model, plan, resumed)
    backups = Backups(backup, save_freq=2, steps_per_epoch=3, phase_steps=resumed, on_backup=run.backup_finished)
    callbacks.append(backups)
    fit_from_position(model, data, 2, 3, position, callbacks, backups, validation_data=validation)
    run.run_finished()


def test_telemetry_follows_a_real_keras_fit(tmp_path):
    m = TrainerMetrics()
    before = time.time()

    _fit(m, str(tmp_path / "backup"), delay=0.3)  # slower than a step even on a busy machine

    assert value(m, metrics.STEP_DURATION + "_count") == 6
    assert value(m, metrics.STEP_COMPUTE + "_count") == 6  # the gradient stamp ran every step
    assert value(m, metrics.IMAGES_PROCESSED) == 6 * 8
    assert value(m, metrics.GLOBAL_STEP) == 6 and value(m, metrics.PROGRESS_RATIO) == 1
    assert value(m, metrics.ETA_SECONDS) == 0
    assert value(m, metrics.EPOCH) == 2
    assert value(m, metrics.PHASE, phase="feature_extraction") == 1
    assert value(m, metrics.STORAGE_READ_BYTES) == 6 * 8 * 100
    # The generator sleeps 0.3 s per batch: steps wait for input (except where a backup or the
    # validation gave the pipeline time to prepare the next batch, and the first, tracing step) ...
    steps = value(m, metrics.STEP_DURATION + "_sum")
    wait = value(m, metrics.INPUT_WAIT)
    assert 0.2 <= wait < steps
    # ... and compute is what is left: no input wait inside it.
    assert value(m, metrics.STEP_COMPUTE + "_sum") < steps - wait + 0.05
    for split in ("train", "validation"):
        assert 0 <= value(m, metrics.ACCURACY, split=split) <= 1
        assert value(m, metrics.LOSS, split=split) > 0
    assert value(m, metrics.LEARNING_RATE) == pytest.approx(0.1)
    assert value(m, metrics.BACKUP_DURATION + "_count") >= 2  # every 2 steps
    assert value(m, metrics.BACKUP_LAST_SUCCESS) >= before
    assert value(m, metrics.BACKUP_FAILURES) == 0
    assert value(m, metrics.RESTORES) == 0
    assert value(m, metrics.ACCELERATOR_MEMORY, device="GPU:0") is None  # CPU only: no series


def test_buffered_input_shows_much_less_wait_than_slow_input(tmp_path):
    slow, fast = TrainerMetrics(), TrainerMetrics()

    _fit(slow, str(tmp_path / "slow"), delay=0.15)
    _fit(fast, str(tmp_path / "fast"), delay=0.0)

    assert value(fast, metrics.INPUT_WAIT) < value(slow, metrics.INPUT_WAIT) / 4


def test_under_xla_the_compute_of_every_step_is_still_stamped(tmp_path):
    m = TrainerMetrics()

    _fit(m, str(tmp_path / "backup"), delay=0.0, xla=True)

    assert value(m, metrics.STEP_COMPUTE + "_count") == value(m, metrics.STEP_DURATION + "_count") == 6
    assert 0 < value(m, metrics.STEP_COMPUTE + "_sum") < value(m, metrics.STEP_DURATION + "_sum")


def test_a_resumed_phase_counts_a_restore_and_keeps_the_global_step(tmp_path):
    m = TrainerMetrics()
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(m, backup, [StopAtStep(3)], delay=0.0)  # backups at steps 2 (and not 3)
    restarted = TrainerMetrics()

    _fit(restarted, backup, delay=0.0)

    assert value(restarted, metrics.RESTORES) == 1
    assert value(restarted, metrics.STEP_DURATION + "_count") == 4  # steps 3..6 only
    assert value(restarted, metrics.GLOBAL_STEP) == 6


def test_a_failed_backup_is_counted(tmp_path):
    from trainer.train.telemetry import RunTelemetry

    m = TrainerMetrics()
    run = RunTelemetry(m, num_workers=1, local_replicas=1, total_steps=1)

    run.backup_finished(2.5, ok=False)
    run.backup_finished(1.5, ok=True)

    assert value(m, metrics.BACKUP_FAILURES) == 1
    assert value(m, metrics.BACKUP_DURATION + "_count") == 1 and value(m, metrics.BACKUP_DURATION + "_sum") == 1.5


# --------------------------------------------------------------------------- Pushgateway


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    gateway = Pushgateway(tmp_path_factory.mktemp("pushgateway") / "pushgateway.log")
    yield gateway
    gateway.stop()


def test_outcome_is_pushed_to_a_real_pushgateway(pushgateway):
    environ = {Env.NAMESPACE.value: "ml", Env.JOB_NAME.value: "flowers-run"}
    outcome = metrics.Outcome(
        exit_code=0,
        started=time.time() - 90,
        global_steps=1200,
        evaluation={"validation": {"loss": 0.4, "accuracy": 0.91, "images": 400}},
    )

    assert metrics.push_outcome(pushgateway.url, "vgg-trainer", outcome, environ=environ)

    text = pushgateway.metrics()
    group = 'instance="",job="vgg-trainer",job_name="flowers-run",namespace="ml"'
    assert f"trainer_run_success{{{group}}} 1" in text
    assert f"trainer_run_global_steps{{{group}}} 1200" in text
    assert f'trainer_run_final_accuracy{{{group},split="validation"}} 0.91' in text
    assert f"trainer_run_exit_code{{{group}}} 0" in text


def test_a_failed_run_replaces_the_group_and_a_dead_gateway_is_a_warning_without_secrets(pushgateway, caplog):
    environ = {Env.NAMESPACE.value: "ml", Env.JOB_NAME.value: "failed-run"}
    assert metrics.push_outcome(pushgateway.url, "vgg-trainer", metrics.Outcome(65, time.time()), environ=environ)
    from trainer.launch import free_ports

    (dead,) = free_ports(1)
    with caplog.at_level(logging.WARNING):
        ok = metrics.push_outcome(f"http://user:s3cret@127.0.0.1:{dead}", "vgg-trainer", metrics.Outcome(0, 0))

    group = 'instance="",job="vgg-trainer",job_name="failed-run",namespace="ml"'
    assert f"trainer_run_success{{{group}}} 0" in pushgateway.metrics()
    assert f"trainer_run_exit_code{{{group}}} 65" in pushgateway.metrics()
    assert ok is False
    assert f"could not push the run outcome to http://127.0.0.1:{dead}" in caplog.text
    assert "s3cret" not in caplog.text


#: The credentials of the Pushgateway behind basic auth; the password needs escaping in a URL.
PUSHER, PASSWORD = "pusher", "s3cr3t:p@ss"


@pytest.fixture(scope="module")
def guarded_pushgateway(tmp_path_factory):
    gateway = Pushgateway(tmp_path_factory.mktemp("guarded") / "pushgateway.log", basic_auth=(PUSHER, PASSWORD))
    yield gateway
    gateway.stop()


def _with_credentials(url: str, password: str = PASSWORD) -> str:
    from urllib.parse import quote

    return url.replace("http://", f"http://{PUSHER}:{quote(password, safe='')}@")


def _secrets_in(text: str) -> list[str]:
    from urllib.parse import quote

    return [s for s in (PASSWORD, quote(PASSWORD, safe=""), "wrong-password", f"{PUSHER}:") if s in text]


def test_the_secret_s_url_wins_and_pushes_with_basic_auth_without_logging_it(guarded_pushgateway, caplog):
    """$TRAINER_PUSHGATEWAY_URL (the chart's Secret) wins over the configuration; its credentials go as basic auth."""
    gateway = guarded_pushgateway
    environ = {Env.NAMESPACE.value: "ml", Env.JOB_NAME.value: "guarded-run"}
    secret_url = _with_credentials(gateway.url)
    url = metrics.pushgateway_url("http://127.0.0.1:1", {**environ, Env.PUSHGATEWAY_URL.value: secret_url})

    with caplog.at_level(logging.INFO):
        pushed = metrics.push_outcome(url, "vgg-trainer", metrics.Outcome(0, time.time(), 7), environ=environ)
        refused = metrics.push_outcome(gateway.url, "vgg-trainer", metrics.Outcome(1, time.time()), environ=environ)

    assert url == secret_url
    assert metrics.pushgateway_url("http://cfg:9091", {}) == "http://cfg:9091"  # no variable: the configuration
    assert pushed is True and refused is False  # the gateway wants the credentials
    group = 'instance="",job="vgg-trainer",job_name="guarded-run",namespace="ml"'
    assert f"trainer_run_global_steps{{{group}}} 7" in gateway.metrics()
    assert f"run outcome pushed to {gateway.url} " in caplog.text
    assert "401" in caplog.text  # the refused push is a warning
    assert _secrets_in(caplog.text) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_real_run_pushes_with_the_secret_s_url_and_writes_no_credentials(guarded_pushgateway, tmp_path):
    """A tiny real run: the variable's credentials push (the configuration's are wrong), and neither
    set of credentials reaches summary.json or the log."""
    import os
    import subprocess

    from tests.support.training import TINY_RUN, make_tiny_dataset, set_args
    from trainer.launch import entrypoint_command

    gateway = guarded_pushgateway
    dataset, output = make_tiny_dataset(tmp_path), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in (Env.TF_CONFIG.value, Env.CONFIG_FILE.value)}
    env.update(
        {
            Env.PUSHGATEWAY_URL.value: _with_credentials(gateway.url),
            Env.NAMESPACE.value: "ml",
            Env.JOB_NAME.value: "real-run",
        }
    )
    args = set_args(
        *TINY_RUN,
        f"data.dataset={dataset}",
        f"output.dir={output}",
        "monitoring.port=0",
        f"monitoring.pushgateway_url={_with_credentials(gateway.url, 'wrong-password')}",
    )

    proc = subprocess.run([*entrypoint_command(), "train", *args], env=env, capture_output=True, text=True, timeout=240)

    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = (output / "summary.json").read_text()
    assert json.loads(summary)["config"]["monitoring"]["pushgateway_url"] == gateway.url
    assert _secrets_in(summary) == []
    assert _secrets_in(proc.stdout + proc.stderr) == []
    group = 'instance="",job="vgg-trainer",job_name="real-run",namespace="ml"'
    assert f"trainer_run_success{{{group}}} 1" in gateway.metrics()


# --------------------------------------------------------------------------- training curves


def _png(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_training_curves_are_a_real_png_with_content():
    from trainer.train.curves import render_curves

    rows = [
        {"phase": p, "epoch": e, "global_step": 4 * i + 4, "loss": 1.5 - 0.1 * i, "val_loss": 1.4 - 0.1 * i,
         "accuracy": 0.3 + 0.05 * i, "val_accuracy": 0.35 + 0.05 * i, "images_per_second": 20.0 + i}
        for i, (p, e) in enumerate([("feature_extraction", 1), ("feature_extraction", 2), ("fine_tuning", 1)])
    ]  # fmt: skip

    image = _png(render_curves(rows))
    empty = _png(render_curves([]))

    assert image.format == "PNG" and image.size == (1000, 800)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, bands, text: not a blank canvas
    assert pixels.std() > 20
    assert empty.size == (1000, 800)


# --------------------------------------------------------------------------- start-up


@pytest.mark.slow
def test_a_worker_waiting_for_its_peers_already_serves_metrics(tmp_path):
    """The endpoint starts before TensorFlow and the rendezvous: a pod stuck at start-up is visible."""
    import os
    import subprocess

    from tests.support.training import TINY_RUN, set_args
    from trainer.cluster import make_tf_config
    from trainer.config import PrepareConfig
    from trainer.data.prepare import prepare_dataset
    from trainer.data.synthetic import make_demo_images
    from trainer.launch import entrypoint_command, free_ports

    make_demo_images(str(tmp_path / "images"), classes=2, per_class=6, size=40, seed=1)
    prepare_dataset(
        str(tmp_path / "images"), str(tmp_path / "dataset"), PrepareConfig(min_shards=2, processes=1),
        progress=lambda _: None,
    )  # fmt: skip
    metrics_port, *peers = free_ports(3)
    env = {
        **os.environ,
        Env.TF_CONFIG.value: make_tf_config([f"localhost:{p}" for p in peers], 0),  # worker 1 never starts
        Env.METRICS_PORT.value: str(metrics_port),
    }
    args = set_args(*TINY_RUN, f"data.dataset={tmp_path / 'dataset'}", f"output.dir={tmp_path / 'run'}")
    worker = subprocess.Popen(
        [*entrypoint_command(), "train", *args, "--set", "runtime.peer_wait_seconds=120"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline, text = time.monotonic() + 60, ""
        while "trainer_build_info" not in text:
            assert worker.poll() is None, worker.stdout.read()[-2000:]
            assert time.monotonic() < deadline, "the metrics endpoint never answered"
            try:
                text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
            except OSError:
                time.sleep(0.2)
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    assert "trainer_global_step 0.0" in text and "trainer_workers 0.0" in text  # nothing trained yet
