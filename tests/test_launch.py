"""The local launcher runs real worker processes the way a Kubernetes Job runs pods."""

from __future__ import annotations

import json
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
