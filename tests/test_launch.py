"""The local launcher runs real worker processes the way a Kubernetes Job runs pods."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.training import LogSink
from trainer.contract import ExitCode
from trainer.errors import ConfigError
from trainer.launch import free_ports, launch_local, worker_env

# A stand-in worker: prints its TF_CONFIG task, then behaves as told by its index.
WORKER = """
import json, os, signal, sys, time
task = json.loads(os.environ["TF_CONFIG"])["task"]
print("task", task["index"], "of", len(json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"]), flush=True)
signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(76)))
behaviour = sys.argv[1:][task["index"]]
if behaviour == "fail":
    sys.exit(65)
time.sleep(float(behaviour))
"""


def run(behaviours: list[str]) -> tuple[int, str, float]:
    sink = LogSink()
    started = time.monotonic()
    code = launch_local(len(behaviours), behaviours, sink=sink, command=[sys.executable, "-c", WORKER])
    return code, sink.text, time.monotonic() - started


def test_every_worker_gets_its_own_task_and_prefixed_logs():
    code, text, _ = run(["0", "0", "0"])

    assert code == ExitCode.OK
    for index in range(3):
        assert f"[worker-{index}] task {index} of 3\n" in text


def test_one_failing_worker_stops_the_others_and_sets_the_exit_code():
    code, text, seconds = run(["60", "fail"])

    assert code == ExitCode.DATA_ERROR
    assert "[worker-0] got SIGTERM" in text
    assert seconds < 30  # worker 0 would have slept 60 s


def test_worker_env_describes_a_worker_only_cluster():
    workers = [f"localhost:{port}" for port in free_ports(2)]

    env = worker_env(workers, 1, base={"PATH": "/bin"})

    assert json.loads(env["TF_CONFIG"]) == {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 1}}
    assert env["PATH"] == "/bin" and len(set(workers)) == 2


PRINT_METRICS_PORT = """
import json, os
print("task", json.loads(os.environ["TF_CONFIG"])["task"]["index"], "metrics", os.environ["TRAINER_METRICS_PORT"])
"""


def test_every_worker_gets_its_own_metrics_port():
    sink = LogSink()

    command = [sys.executable, "-c", PRINT_METRICS_PORT]
    code = launch_local(3, [], sink=sink, command=command)
    given = LogSink()
    chosen = launch_local(2, [], sink=given, command=command, metrics_ports=[9101, 9102])

    ports = [line.split()[-1] for line in sorted(sink.text.splitlines())]
    assert code == chosen == ExitCode.OK
    assert len(ports) == 3 and len(set(ports)) == 3 and all(int(p) > 0 for p in ports)
    assert sorted(given.text.splitlines()) == ["[worker-0] task 0 metrics 9101", "[worker-1] task 1 metrics 9102"]


def test_metrics_ports_must_match_the_worker_count():
    with pytest.raises(ConfigError, match="2 metrics port\\(s\\) given for 3 workers"):
        launch_local(3, [], sink=LogSink(), command=[sys.executable, "-c", "pass"], metrics_ports=[9101, 9102])


# --------------------------------------------------------------------------- stopping
# The launcher runs in a process of its own here, so that it can be sent SIGTERM like a user would.

# A stand-in worker that backs up on SIGTERM: it writes a file after `seconds` (a slow step
# and its backup), then exits 76. "ignore" ignores SIGTERM altogether.
BACKING_UP_WORKER = """
import json, os, signal, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
out, seconds, failing = sys.argv[1], sys.argv[2], sys.argv[3:]
def backup(*_):
    if seconds == "ignore":
        return
    time.sleep(float(seconds))
    open(os.path.join(out, f"backup-{index}"), "w").close()
    sys.exit(76)
signal.signal(signal.SIGTERM, backup)
print("ready", flush=True)
if str(index) in failing:
    sys.exit(75)
while True:
    time.sleep(0.1)
"""

LAUNCHER = f"""
import sys
from trainer.launch import launch_local
grace, workers, args = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
sys.exit(launch_local(workers, args, command=[sys.executable, "-c", {BACKING_UP_WORKER!r}], grace_seconds=grace))
"""


def _start_launcher(tmp_path, grace: float, *worker_args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(grace), "2", str(tmp_path), *worker_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ready = 0
    for line in proc.stdout:
        ready += "ready" in line
        if ready == 2:
            return proc
    raise AssertionError(f"the workers never started (exit {proc.wait()})")


def test_a_stopped_launch_waits_for_slow_backups_beyond_its_grace_and_exits_preempted(tmp_path):
    launcher = _start_launcher(tmp_path, 0.5, "2")  # each backup takes 2 s, four times the grace

    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=30)

    assert launcher.returncode == ExitCode.PREEMPTED, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup-0", "backup-1"]  # nobody was killed mid-backup


def test_a_second_stop_request_kills_the_workers_at_once(tmp_path):
    launcher = _start_launcher(tmp_path, 60, "ignore")
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.5)

    started = time.monotonic()
    launcher.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = launcher.communicate(timeout=30)

    assert launcher.returncode == ExitCode.PREEMPTED, output
    assert time.monotonic() - started < 10  # not the 60 s grace
    assert not list(tmp_path.iterdir())


def test_after_a_failure_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    started = time.monotonic()
    launcher = _start_launcher(tmp_path, 1, "ignore", "1")  # worker 1 fails with 75; worker 0 ignores SIGTERM

    output, _ = launcher.communicate(timeout=30)

    assert launcher.returncode == ExitCode.TRANSIENT, output  # the failure's code, not the kill's
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("flags", "address"),
    [([], "127.0.0.1"), (["--listen-address", "0.0.0.0"], "0.0.0.0"), (["--set", "monitoring.address='::'"], "[::]")],
    ids=["loopback-by-default", "listen-address", "configured-address"],
)
def test_launched_workers_serve_metrics_on_loopback_unless_told_otherwise(tmp_path, flags, address):
    """The real `trainer launch`; each worker serves metrics before it reads the (missing) dataset."""
    (tmp_path / "empty").mkdir()
    dirs = ["--set", f"data.dataset={tmp_path / 'empty'}", "--set", f"output.dir={tmp_path / 'run'}"]
    cmd = [sys.executable, "-m", "trainer", "launch", "--workers", "2", *dirs, *flags]

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    assert proc.returncode == ExitCode.DATA_ERROR, proc.stdout[-3000:] + proc.stderr[-3000:]
    for index in range(2):
        assert re.search(
            rf"^\[worker-{index}\] .*metrics on http://{re.escape(address)}:\d+/metrics$", proc.stdout, re.M
        )
    assert "TensorFlow gRPC ports" in proc.stderr and "without authentication" in proc.stderr
