"""The kubelet's liveness probe, as pure rules: which probe a container has, when to probe, when to kill.

What the rules say (https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/,
"Configure Probes" and "HTTP probes") and where each is decided here:

- **The probe** (:func:`liveness_probe`): ``httpGet`` with ``path`` (default "/"), ``port`` ("Name or
  number of the port to access on the container") and ``scheme`` (HTTP); ``initialDelaySeconds``
  (default 0), ``periodSeconds`` (10), ``timeoutSeconds`` (1), ``failureThreshold`` (3) and a
  probe-level ``terminationGracePeriodSeconds`` that, when set, replaces the pod's.
- **When** (:meth:`LivenessState.next_probe`): the kubelet's probe worker probes as soon as the
  container runs, then every ``periodSeconds``; a tick before ``initialDelaySeconds`` is skipped
  (which is why the docs say a period longer than the delay makes the delay moot).
- **The verdict** (:meth:`LivenessState.record`): a response with 200 <= status < 400 succeeds,
  anything else (another status, a timeout, a refused connection) fails; after
  ``failureThreshold`` failures in a row the container is killed, with the grace above.

The runner (trainer.jobrunner.runner) sends the HTTP requests and does the kill. Not emulated:
exec, tcpSocket and gRPC probes, HTTPS, ``host``, ``httpHeaders``, redirects (a 3xx counts as
success without being followed), readiness probes (nothing here routes traffic) and startup
probes (refused: they would delay the liveness probe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from trainer.errors import ConfigError

DEFAULT_PERIOD_SECONDS = 10
DEFAULT_TIMEOUT_SECONDS = 1
DEFAULT_FAILURE_THRESHOLD = 3


@dataclass(frozen=True)
class HttpProbe:
    """A container's ``livenessProbe.httpGet``, its port resolved to a number."""

    port: int
    path: str = "/"
    initial_delay: float = 0.0
    period: float = DEFAULT_PERIOD_SECONDS
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    grace_seconds: float | None = None  # probe-level terminationGracePeriodSeconds; None: the pod's

    def kill_grace(self, pod_grace: float) -> float:
        """Seconds from SIGTERM to SIGKILL after a failed probe: the probe's own grace wins."""
        return pod_grace if self.grace_seconds is None else self.grace_seconds


def liveness_probe(container: Any) -> HttpProbe | None:
    """The container's (a V1Container) liveness probe, or None; ConfigError for what is not emulated."""
    if container.startup_probe is not None:
        raise ConfigError(f"container {container.name!r}: startupProbe is not emulated by the local Job runner")
    probe = container.liveness_probe
    if probe is None:
        return None
    action = probe.http_get
    if action is None:
        raise ConfigError(f"container {container.name!r}: only httpGet liveness probes are emulated")
    if (action.scheme or "HTTP").upper() != "HTTP":
        raise ConfigError(f"container {container.name!r}: liveness probe scheme {action.scheme}: only HTTP")

    def given(value: Any, default: float | None) -> float | None:
        return default if value is None else float(value)

    return HttpProbe(
        port=container_port(container, action.port),
        path=action.path or "/",
        initial_delay=given(probe.initial_delay_seconds, 0.0),
        period=given(probe.period_seconds, DEFAULT_PERIOD_SECONDS),
        timeout=given(probe.timeout_seconds, DEFAULT_TIMEOUT_SECONDS),
        failure_threshold=int(given(probe.failure_threshold, DEFAULT_FAILURE_THRESHOLD)),
        grace_seconds=given(probe.termination_grace_period_seconds, None),
    )


def container_port(container: Any, port: int | str) -> int:
    """A probe's port: a number as it is, a name looked up among the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for item in container.ports or []:
        if item.name == port:
            return int(item.container_port)
    raise ConfigError(f"container {container.name!r}: the liveness probe's port {port!r} names no container port")


@dataclass
class LivenessState:
    """One container's probe: when the next probe is due, failures in a row, whether it was killed.

    Time is what the caller passes (seconds, monotonic), so every decision can be replayed in a test.
    """

    probe: HttpProbe
    started: float  # when the container started
    failures: int = 0
    tick: int = 0  # the first tick (started + tick x period) the next probe may use
    killed: bool = False

    def next_probe(self) -> float:
        """When the next probe is due: the first tick (started + k x period) not before the initial delay."""
        period = self.probe.period
        first = math.ceil(self.probe.initial_delay / period - 1e-9)  # the first tick the delay allows
        return self.started + max(first, self.tick) * period

    def record(self, success: bool, now: float) -> bool:
        """The result of the probe sent at its tick; whether the container must be killed now."""
        # The kubelet's ticker drops ticks a slow probe (timeout > period) overran.
        self.tick = max(math.floor((now - self.started) / self.probe.period) + 1, self.tick + 1)
        self.failures = 0 if success else self.failures + 1
        if self.failures >= self.probe.failure_threshold and not self.killed:
            self.killed = True  # restartPolicy Never: the container stays dead, so no more probes
            return True
        return False


def succeeded(status: int) -> bool:
    """The docs: "Any code greater than or equal to 200 and less than 400 indicates success."""
    return 200 <= status < 400
