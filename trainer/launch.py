"""Run N worker processes of `trainer train` on this machine, like N pods would.

Each worker gets its own TF_CONFIG (``localhost`` ports picked free) and its own metrics
port ($TRAINER_METRICS_PORT, picked free unless given), runs exactly the container's
entrypoint, and has its output prefixed with ``[worker-i]``.

Stopping, as on Kubernetes: a SIGTERM or Ctrl-C to the launcher is passed to every worker,
which backs up at its next agreed stop check and exits 76 (the run resumes from that backup);
the launcher then exits 76. It never kills a worker that is finishing its step (however slow),
unless asked a second time. If a worker fails, the others get SIGTERM, and SIGKILL once the
grace (``runtime.stop_check_seconds`` + ``STOP_MARGIN_SECONDS``) has passed; the launcher exits
with the failed worker's code, and says which worker failed and which it killed.

The workers are trainer.supervisor children (a process group each); the launcher's handler for
the stop signals is a trainer.signals.stop_requests handler, held while the workers run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence

from trainer.cluster import make_tf_config
from trainer.config import RuntimeConfig
from trainer.contract import ENTRYPOINT, STOP_MARGIN_SECONDS, Env, ExitCode
from trainer.errors import ConfigError
from trainer.signals import STOP_SIGNALS, stop_requests
from trainer.supervisor import Child, describe_exit


def stop_grace_seconds(runtime: RuntimeConfig) -> float:
    """How long a stopping worker may take: the next stop check, then the step in progress and a backup."""
    return runtime.stop_check_seconds + STOP_MARGIN_SECONDS


#: The grace with the default configuration.
GRACE_SECONDS = stop_grace_seconds(RuntimeConfig())


def entrypoint_command() -> list[str]:
    """The installed console script (what the container runs), else `python -m trainer`."""
    script = os.path.join(os.path.dirname(sys.executable), ENTRYPOINT)
    if os.path.exists(script):
        return [script]
    found = shutil.which(ENTRYPOINT)
    return [found] if found else [sys.executable, "-m", "trainer"]


def free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("localhost", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_env(
    workers: list[str], index: int, base: dict[str, str] | None = None, metrics_port: int | None = None
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[Env.TF_CONFIG.value] = make_tf_config(workers, index)
    env[Env.LOG_PREFIX.value] = f"worker-{index}"
    env.setdefault(Env.RUN_OWNER.value, f"trainer launch pid {os.getpid()} on {socket.gethostname()}")
    if metrics_port is not None:
        env[Env.METRICS_PORT.value] = str(metrics_port)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def launch_local(
    num_workers: int,
    args: Sequence[str],
    sink=None,
    command: Sequence[str] | None = None,
    metrics_ports: Sequence[int] | None = None,
    grace_seconds: float = GRACE_SECONDS,
) -> int:
    """Run the workers to completion; 0 when all succeed, 76 when stopped, else the first failure's code.

    ``command`` replaces the trainer entrypoint (tests use it to run other programs).
    ``metrics_ports`` are the workers' metrics ports (default: free ones, so they never collide).
    """
    if num_workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {num_workers}")
    if metrics_ports is not None and len(metrics_ports) != num_workers:
        raise ConfigError(f"{len(metrics_ports)} metrics port(s) given for {num_workers} workers; give one per worker")
    sink = sink or sys.stdout
    ports = free_ports(2 * num_workers)
    workers = [f"localhost:{port}" for port in ports[:num_workers]] if num_workers > 1 else []
    metrics_ports = list(metrics_ports or ports[num_workers:])
    command = list(command or entrypoint_command()) + list(args)
    if workers:
        _say(grpc_exposure_warning(ports[:num_workers]))
    children: list[Child] = []
    sink_lock = threading.Lock()  # the workers' output threads share the sink
    try:
        for index in range(num_workers):
            env = worker_env(workers, index, metrics_port=metrics_ports[index])
            if num_workers == 1:
                env.pop(Env.TF_CONFIG.value, None)
            output = _prefixed(sink, f"worker-{index}", sink_lock)
            children.append(Child(command, env=env, on_line=output, stdin=None))
        group = WorkerGroup(children, grace_seconds)
        # SIGTERM and Ctrl-C go to the workers while they run (trainer.signals: the launcher's link of the chain).
        with stop_requests(group.on_stop_signal, STOP_SIGNALS):
            return group.wait()
    finally:
        for child in children:  # an exception in the wait must not leave workers behind
            child.kill()
            child.wait()
            child.join_output()


def _prefixed(sink, prefix: str, lock: threading.Lock):
    def write(line: str) -> None:
        with lock:
            sink.write(f"[{prefix}] {line}")
            sink.flush()

    return write


def grpc_exposure_warning(ports: Sequence[int]) -> str:
    """TensorFlow's gRPC server listens on every interface (0.0.0.0 and [::], whatever address its
    task has; it has no option to bind one) and authenticates no one: say so once per launch."""
    listed = ", ".join(str(p) for p in ports)
    return (
        f"the workers' TensorFlow gRPC ports ({listed}) accept connections on every interface without "
        "authentication; on a shared or untrusted network block them (firewall) or run the workers in "
        'private network namespaces with `trainer job run` (docs/operations.md, "Trust model")'
    )


def _say(message: str) -> None:
    print(f"launcher: {message}", file=sys.stderr, flush=True)


class WorkerGroup:
    """The launcher's policy over its workers: stop them on a request or a failure, and name who did what.

    A user's stop request never kills a worker that is still backing up unless asked twice; a
    failure's SIGTERM to the others is followed by SIGKILL after the grace.
    """

    def __init__(self, children: list[Child], grace_seconds: float):
        self.children, self.grace = children, grace_seconds
        self.stop_requests = 0
        self.failure: tuple[int, int] | None = None  # (worker index, returncode) of the first failure
        self._told_still_waiting = False

    def on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.stop_requests += 1
        if self.stop_requests == 1:
            _say(
                f"{name}: stopping the workers; each backs up at its next stop check (runtime.stop_check_seconds, "
                f"or the step in progress if slower) and exits {int(ExitCode.PREEMPTED)}; {name} again kills them now"
            )
            self._terminate(grace_seconds=None)  # asked by the user: never kill a backup in progress unasked
        else:
            _say(f"{name} again: killing the workers; the run resumes from its last backup")
            for child in self.children:
                child.kill()  # in a signal handler: the wait loop reaps them

    def wait(self) -> int:
        while True:
            codes = [child.poll() for child in self.children]
            if self.failure is None and not self.stop_requests:
                self._check_failure(codes)
            if all(code is not None for code in codes):
                return self._result(codes)
            self._enforce_grace()
            time.sleep(0.2)

    def _check_failure(self, codes: list[int | None]) -> None:
        failed = [(index, code) for index, code in enumerate(codes) if code not in (None, 0)]
        if not failed:
            return
        self.failure = failed[0]
        index, code = self.failure
        _say(f"worker-{index} failed ({describe_exit(code)}); stopping the others")
        self._terminate(self.grace)

    def _enforce_grace(self) -> None:
        now = time.monotonic()
        for index, child in enumerate(self.children):
            if child.kill_at is not None and now >= child.kill_at and child.running:
                _say(f"worker-{index} did not stop within {self.grace:g} s of SIGTERM; killing it")
                child.enforce_grace(now)
        self._tell_still_waiting(now)

    def _tell_still_waiting(self, now: float) -> None:
        if not self.stop_requests or self._told_still_waiting:
            return
        asked = min((c.terminated_at for c in self.children if c.terminated_at is not None), default=now)
        alive = [i for i, child in enumerate(self.children) if child.running]
        if alive and now - asked >= self.grace:
            self._told_still_waiting = True
            names = ", ".join(f"worker-{i}" for i in alive)
            _say(f"{names} still finishing a step after {self.grace:g} s; waiting (ask again to kill now)")

    def _result(self, codes: list[int]) -> int:
        if self.failure is not None:
            code = self.failure[1]
            return code if code > 0 else int(ExitCode.INTERNAL)  # a death by signal is not a user error
        if not self.stop_requests:
            return int(ExitCode.OK)  # no failure: every worker exited 0
        stopped = (0, ExitCode.PREEMPTED)
        killed = {i for i, child in enumerate(self.children) if child.killed}
        unexpected = [(i, c) for i, c in enumerate(codes) if c not in stopped and i not in killed]
        if unexpected:
            index, code = unexpected[0]
            _say(f"worker-{index} ended with {describe_exit(code)} while stopping")
            return code if code > 0 else int(ExitCode.INTERNAL)
        return int(ExitCode.OK) if all(code == 0 for code in codes) else int(ExitCode.PREEMPTED)

    def _terminate(self, grace_seconds: float | None) -> None:
        for child in self.children:
            child.terminate(grace_seconds)
