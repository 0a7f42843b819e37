"""The runner's liveness probe on real processes over real HTTP, and what the trainer's /healthz catches.

Each pod runs tests/support/healthz_pod.py: trainer.metrics' real endpoint in its own thread, then
a chosen way of being stuck in the main thread. The runner probes it from the node's side of the
pod network (the hub namespace) at the pod's IP, as the kubelet probes from the node. Answers to
"is a stuck trainer killed by its probe?", measured here (CPython 3.11):

- frozen (SIGSTOP) or stuck in a C call that holds the GIL: /healthz times out, the pod is killed
  (SIGTERM, then SIGKILL after the probe's grace: exit 137);
- a pure-Python busy loop, a C call that released the GIL, a TensorFlow op that never returns:
  /healthz keeps answering and the probe never fires (the collective and heartbeat timeouts must
  catch those: docs/operations.md).
"""

from __future__ import annotations

import pathlib
import signal
import sys
import time

import pytest
import yaml

from tests.support.jobs import NAMESPACE, Capture, needs_namespaces
from trainer.jobrunner import JobRunner
from trainer.jobrunner.network import pod_address
from trainer.jobrunner.runner import http_probe

POD_PROGRAM = pathlib.Path(__file__).resolve().parents[1] / "support" / "healthz_pod.py"
PORT = 9090
PERIOD, THRESHOLD, GRACE = 1, 2, 1

pytestmark = needs_namespaces


def _job(mode: str, port: int | str = "health", timeout: int = 1) -> str:
    probe = {
        "httpGet": {"path": "/healthz", "port": port},
        "initialDelaySeconds": 1,  # the endpoint is up within a second of the start
        "periodSeconds": PERIOD,
        "timeoutSeconds": timeout,
        "failureThreshold": THRESHOLD,
        "terminationGracePeriodSeconds": GRACE,
    }
    container = {
        "name": "app",
        "image": "local",
        "command": ["python", str(POD_PROGRAM), mode, str(PORT)],
        "ports": [{"name": "health", "containerPort": PORT}],
        "livenessProbe": probe,
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "probe", "namespace": NAMESPACE},
        "spec": {
            "completionMode": "Indexed",
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 30, "containers": [container]}
            },
        },
    }
    return yaml.safe_dump(job)


def _runner(mode: str, **job) -> JobRunner:
    return JobRunner(_job(mode, **job), executables={"python": [sys.executable]}, sink=Capture())


def _reasons(runner: JobRunner) -> list[str]:
    return [e.reason for e in runner.events if e.reason in ("Unhealthy", "Killing", "PodFailed")]


def _kill_of(runner: JobRunner, stuck_at: float) -> tuple[float, int]:
    """(seconds from being stuck to the pod's exit, its exit code) once the probe has killed it."""
    status = runner.wait(timeout=30)
    assert status.conditions[-1].type == "Failed"
    pod = runner.pods_of(0)[0]
    return pod.finished - stuck_at, pod.exit_code


def _assert_killed_by_its_probe(runner: JobRunner, after: float) -> None:
    assert _reasons(runner) == ["Unhealthy"] * THRESHOLD + ["Killing", "PodFailed"], runner.events
    unhealthy = [e.message for e in runner.events if e.reason == "Unhealthy"]
    assert all(m.startswith('Liveness probe failed: Get "http://198.18.0.10:9090/healthz"') for m in unhealthy)
    failed = next(e for e in runner.events if e.reason == "PodFailed")
    assert failed.exit_code == 137  # SIGKILL after the grace: the stuck process never acted on SIGTERM
    # At most: the tick in progress, THRESHOLD timed-out probes one period apart, the grace.
    assert after < PERIOD + THRESHOLD * (PERIOD + 1) + GRACE + 2, after


def _assert_still_answering(runner: JobRunner, periods: int = 4) -> float:
    """The runner's probes keep succeeding for ``periods`` periods; the slowest /healthz answer seen."""
    pod = runner.live_pod(0)
    ticks, seen = pod.liveness.tick, len(runner.events)
    slowest, end = 0.0, time.monotonic() + periods * PERIOD + 0.5
    while time.monotonic() < end:  # meanwhile, ask /healthz as the probe does and time the answers
        sent = time.monotonic()
        ok, detail = http_probe(runner.network.socket, pod_address(0), pod.plan.liveness)
        assert ok, detail
        slowest = max(slowest, time.monotonic() - sent)
        time.sleep(0.1)
    assert runner.live_pod(0) is pod, runner.events
    assert pod.liveness.tick >= ticks + periods - 1  # the runner's probes were sent ...
    assert [e for e in runner.events[seen:] if e.reason in ("Unhealthy", "Killing")] == []  # ... and answered
    return slowest


def test_a_healthy_pod_is_probed_and_a_frozen_one_killed_by_its_named_port_probe():
    with _runner("idle") as runner:
        runner.start()
        runner.wait_for_log(0, "stuck: idle", timeout=30)
        _assert_still_answering(runner, periods=2)
        frozen_at = time.monotonic()
        runner.kill_pod(0, signal.SIGSTOP)
        after, _ = _kill_of(runner, frozen_at)
        _assert_killed_by_its_probe(runner, after)
        killing = next(e for e in runner.events if e.reason == "Killing")
        assert killing.message.startswith("Container app failed liveness probe")
        assert f"SIGKILL after {GRACE} s" in killing.message  # the probe's grace, not the pod's 30 s
    print(f"\nfigures: frozen pod killed {after:.1f} s after SIGSTOP")


def test_a_process_stuck_in_a_c_call_holding_the_gil_is_killed():
    with _runner("c-holding-gil", port=PORT) as runner:
        runner.start()
        runner.wait_for_log(0, "stuck: c-holding-gil", timeout=30)
        stuck_at = time.monotonic()
        after, _ = _kill_of(runner, stuck_at)
        _assert_killed_by_its_probe(runner, after)
        # SIGTERM interrupted the C call and the handler ran; the loop blocked again, so SIGKILL came.
        assert "SIGTERM noted" in runner.pod_log(0)
    print(f"\nfigures: C call holding the GIL: killed {after:.1f} s after it began")


# The probes that must keep succeeding get a longer timeout: these 2 cores are shared, and a
# second of scheduling delay is not what is measured (the slowest answer is printed).
@pytest.mark.parametrize("mode", ["python-spin", "c-releasing-gil"])
def test_a_process_stuck_without_holding_the_gil_for_good_still_answers(mode):
    with _runner(mode, port=PORT, timeout=3) as runner:
        runner.start()
        runner.wait_for_log(0, f"stuck: {mode}", timeout=30)
        slowest = _assert_still_answering(runner)
        runner.close(grace_seconds=1)
    print(f"\nfigures: {mode}: slowest /healthz answer {slowest * 1000:.0f} ms")


@pytest.mark.slow
def test_a_tensorflow_op_that_never_returns_still_answers():
    with _runner("tf-blocked", port=PORT, timeout=3) as runner:
        runner.start()
        runner.wait_for_log(0, "stuck: tf-blocked", timeout=120)
        slowest = _assert_still_answering(runner)
        runner.close(grace_seconds=1)
    print(f"\nfigures: tf-blocked: slowest /healthz answer {slowest * 1000:.0f} ms")
