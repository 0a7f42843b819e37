"""The liveness probe's rules (trainer.jobrunner.probes) against the Kubernetes documentation.

Quotes are from https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/
("Configure Probes", "HTTP probes", "Use a named port", "Probe-level terminationGracePeriodSeconds").
Pure: no processes, times are numbers.
"""

from __future__ import annotations

import pytest

from trainer.errors import ConfigError
from trainer.jobrunner.manifests import to_model
from trainer.jobrunner.probes import HttpProbe, LivenessState, liveness_probe, succeeded


def _container(probe: dict | None, ports: list | None = None, **extra) -> object:
    spec = {"name": "trainer", "image": "x", "ports": ports or [{"name": "metrics", "containerPort": 9090}]}
    if probe is not None:
        spec["livenessProbe"] = probe
    return to_model({**spec, **extra}, "V1Container")


def test_defaults_of_an_http_probe():
    """ "initialDelaySeconds ... Defaults to 0 seconds", "periodSeconds ... Default to 10 seconds",
    "timeoutSeconds ... Defaults to 1 second", failureThreshold "Defaults to 3" (the Probe API
    reference); httpGet "path: ... Defaults to "/"."."""
    probe = liveness_probe(_container({"httpGet": {"port": 8080}}))
    assert probe == HttpProbe(port=8080, path="/", initial_delay=0, period=10, timeout=1, failure_threshold=3)


def test_a_named_port_is_the_container_port_of_that_name():
    """ "You can use a named port for HTTP and TCP probes" ("port: Name or number of the port to
    access on the container")."""
    probe = liveness_probe(_container({"httpGet": {"path": "/healthz", "port": "metrics"}}))
    assert (probe.port, probe.path) == (9090, "/healthz")
    with pytest.raises(ConfigError, match="names no container port"):
        liveness_probe(_container({"httpGet": {"port": "nope"}}))


def test_no_probe_and_probes_not_emulated():
    assert liveness_probe(_container(None)) is None
    with pytest.raises(ConfigError, match="only httpGet"):
        liveness_probe(_container({"exec": {"command": ["true"]}}))
    with pytest.raises(ConfigError, match="only HTTP"):
        liveness_probe(_container({"httpGet": {"port": 1, "scheme": "HTTPS"}}))
    with pytest.raises(ConfigError, match="startupProbe"):
        liveness_probe(_container(None, startupProbe={"httpGet": {"port": 1}}))


def test_success_is_a_status_from_200_to_399():
    """ "Any code greater than or equal to 200 and less than 400 indicates success. Any other code
    indicates failure." """
    assert [succeeded(code) for code in (199, 200, 302, 399, 400, 500)] == [False, True, True, True, False, False]


def test_the_container_is_killed_after_failure_threshold_failures_in_a_row():
    """ "After a probe fails failureThreshold times in a row, Kubernetes considers that the overall
    check has failed ... triggers a restart for that specific container." A success in between
    starts the count again."""
    state = LivenessState(HttpProbe(port=1, period=1, failure_threshold=3), started=0.0)
    results = [False, False, True, False, False]
    assert [state.record(ok, now=t) for t, ok in enumerate(results)] == [False] * 5
    assert state.failures == 2
    assert state.record(False, now=5) is True  # the third in a row
    assert state.killed
    assert state.record(False, now=6) is False  # killed once: the container is gone


def test_probes_come_every_period_from_the_start_of_the_container():
    """ "periodSeconds: How often (in seconds) to perform the probe." The kubelet's probe worker
    probes as soon as the container runs and then on a ticker of periodSeconds."""
    state = LivenessState(HttpProbe(port=1, period=2), started=100.0)
    due = []
    for _ in range(3):
        due.append(state.next_probe())
        state.record(True, now=due[-1] + 0.01)  # a fast answer
    assert due == [100.0, 102.0, 104.0]


def test_a_probe_slower_than_the_period_skips_the_ticks_it_overran():
    """ "timeoutSeconds: Number of seconds after which the probe times out." A probe that takes its
    whole timeout (longer than the period here) does not make the next ones bunch up."""
    state = LivenessState(HttpProbe(port=1, period=1, timeout=3), started=0.0)
    state.record(False, now=3.0)  # sent at 0, timed out at 3
    assert state.next_probe() == 4.0


def test_the_initial_delay_postpones_the_first_probe_to_a_tick_after_it():
    """ "initialDelaySeconds: Number of seconds after the container has started before startup,
    liveness or readiness probes are initiated. ... If the value of periodSeconds is greater than
    initialDelaySeconds then the initialDelaySeconds would be ignored." """
    assert LivenessState(HttpProbe(port=1, period=5, initial_delay=10), started=0.0).next_probe() == 10.0
    assert LivenessState(HttpProbe(port=1, period=4, initial_delay=10), started=0.0).next_probe() == 12.0
    # A period longer than the delay: the first tick after the start is already past the delay.
    assert LivenessState(HttpProbe(port=1, period=10, initial_delay=3), started=0.0).next_probe() == 10.0


def test_the_probes_own_grace_period_replaces_the_pods():
    """ "When both a pod- and probe-level terminationGracePeriodSeconds are set, the kubelet will
    use the probe-level value." Without one, "The default is to inherit the Pod-level value"."""
    with_own = liveness_probe(_container({"httpGet": {"port": 1}, "terminationGracePeriodSeconds": 5}))
    assert with_own.kill_grace(pod_grace=300) == 5
    assert liveness_probe(_container({"httpGet": {"port": 1}})).kill_grace(pod_grace=300) == 300
