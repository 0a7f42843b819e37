"""Run N worker processes of `trainer train` on this machine, like N pods would.

Each worker gets its own TF_CONFIG (``localhost`` ports picked free) and its own metrics
port ($TRAINER_METRICS_PORT, picked free unless given), runs exactly the container's
entrypoint, and has its output prefixed with ``[worker-i]``. If any worker fails, the
others are stopped (SIGTERM, then SIGKILL after a grace period) and the launcher exits
with the first failure's code.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from trainer.cluster import make_tf_config
from trainer.contract import ENTRYPOINT, Env, ExitCode
from trainer.errors import ConfigError

GRACE_SECONDS = 20.0


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
    if metrics_port is not None:
        env[Env.METRICS_PORT.value] = str(metrics_port)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pump(stream, prefix: str, sink) -> None:
    for line in iter(stream.readline, ""):
        sink.write(f"[{prefix}] {line}")
        sink.flush()
    stream.close()


def launch_local(
    num_workers: int,
    args: Sequence[str],
    sink=None,
    command: Sequence[str] | None = None,
    metrics_ports: Sequence[int] | None = None,
) -> int:
    """Run the workers to completion; 0 when all succeed, else the first failure's code.

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
    procs, pumps = [], []
    for index in range(num_workers):
        env = worker_env(workers, index, metrics_port=metrics_ports[index])
        if num_workers == 1:
            env.pop(Env.TF_CONFIG.value, None)
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"worker-{index}", sink), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    previous = signal.signal(signal.SIGTERM, lambda *_: _stop_all(procs))
    try:
        code = _wait(procs)
    except KeyboardInterrupt:
        _stop_all(procs)
        code = int(ExitCode.PREEMPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for pump in pumps:
            pump.join(timeout=5)
    return code


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for all; on the first failure stop the rest and return its code."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            index, code = failed[0]
            print(f"launcher: worker-{index} failed with exit code {code}; stopping the others", file=sys.stderr)
            _stop_all(procs)
            return code if code > 0 else int(ExitCode.INTERNAL)  # killed by a signal: negative code
        if all(c == 0 for c in codes):
            return int(ExitCode.OK)
        time.sleep(0.2)


def _stop_all(procs: list[subprocess.Popen], grace: float = GRACE_SECONDS) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
