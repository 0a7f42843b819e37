"""The stuck collective: a worker alive and heartbeating that never enters the next collective.

Two real `trainer train` processes (MultiWorkerMirroredStrategy on localhost); one worker's training
input blocks forever after 3 batches (the ``$TRAINER_TEST_STALL_INPUT_AFTER`` test hook).

- worker 1 stuck: worker 0 waits in the all-reduce until ``runtime.collective_timeout_seconds``
  (DeadlineExceededError) and exits 75; with it the coordination service (hosted by worker 0) is
  gone and its port closed, which worker 1's group watch (trainer.group_watch) sees within two
  polls: worker 1 exits 75 ``GRACE_SECONDS`` later. The heartbeat timeout is set far above the
  bound: it plays no part.
- worker 0 (the coordination service's host) stuck: worker 1 times out and exits 75; the service
  declares it unhealthy ``runtime.heartbeat_timeout_seconds`` later, and worker 0's watch ends it.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from tests.support.training import TINY_RUN, make_tiny_dataset, set_args
from trainer.contract import Env, ExitCode
from trainer.group_watch import GRACE_SECONDS, POLL_SECONDS
from trainer.launch import entrypoint_command, free_ports, worker_env

pytestmark = pytest.mark.slow

COLLECTIVE_TIMEOUT = 20
#: What the bound allows past its timeouts, counted from the stall: the step in flight when the
#: input stalls (prefetch runs ahead), the group watch's two polls and grace, the processes' exits.
MARGIN_SECONDS = 10 + 2 * POLL_SECONDS + GRACE_SECONDS
STALL_LINE = "test hook: training input stalled"


class Worker:
    """One trainer process, its output read as it comes (the stall's time is when its line arrives)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.stalled_at: float | None = None
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if self.stalled_at is None and STALL_LINE in line:
                self.stalled_at = time.monotonic()
            self.lines.append(line)

    def wait_for_stall(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.stalled_at is None and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert self.stalled_at is not None, "".join(self.lines)[-4000:]
        return self.stalled_at

    def wait(self, until: float) -> tuple[int | None, float]:
        """(exit code, when it exited); code None if it still runs at ``until`` (a monotonic time)."""
        try:
            code = self.process.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None, time.monotonic()
        ended = time.monotonic()
        self._reader.join(timeout=10)
        return code, ended

    @property
    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("error:")]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("stuck", "heartbeat_timeout", "bound"),
    [
        # Far above the bound: detection must not come from heartbeats.
        pytest.param(1, 120, COLLECTIVE_TIMEOUT + MARGIN_SECONDS, id="worker-1-stuck"),
        pytest.param(0, 10, COLLECTIVE_TIMEOUT + 10 + MARGIN_SECONDS, id="leader-stuck"),
    ],
)
def test_a_worker_stuck_outside_the_collective_makes_every_worker_exit_75_within_the_bound(
    tmp_path, stuck, heartbeat_timeout, bound
):
    dataset = make_tiny_dataset(tmp_path)
    settings = [
        *TINY_RUN,
        f"data.dataset={dataset}",
        f"output.dir={tmp_path / 'run'}",
        f"runtime.collective_timeout_seconds={COLLECTIVE_TIMEOUT}",
        f"runtime.heartbeat_timeout_seconds={heartbeat_timeout}",
        "runtime.peer_wait_seconds=60",
    ]
    args = [*entrypoint_command(), "train", *set_args(*settings)]
    hosts = [f"localhost:{port}" for port in free_ports(2)]
    envs = [worker_env(hosts, i, metrics_port=port) for i, port in enumerate(free_ports(2))]
    envs[stuck][Env.TEST_STALL_INPUT_AFTER.value] = "3"
    workers = [Worker(args, env) for env in envs]
    try:
        stalled_at = workers[stuck].wait_for_stall(timeout=150)
        # Past the bound by a little, so a failure shows how far each got rather than hanging.
        ended = [worker.wait(until=stalled_at + bound + 10) for worker in workers]
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
    logs = ["".join(w.lines)[-4000:] for w in workers]

    assert [code for code, _ in ended] == [ExitCode.TRANSIENT, ExitCode.TRANSIENT], logs
    after = [when - stalled_at for _, when in ended]
    assert max(after) < bound, (after, logs)
    assert min(after) >= COLLECTIVE_TIMEOUT - 1, after  # the collective timeout, not another fault, ended it
    assert [len(w.errors) for w in workers] == [1, 1], [w.errors for w in workers]
    waiting = workers[1 - stuck]
    assert "DeadlineExceededError" in waiting.errors[0], waiting.errors
    print(f"\nfigures: after the stall, worker 0 exited after {after[0]:.1f} s, worker 1 after {after[1]:.1f} s")
