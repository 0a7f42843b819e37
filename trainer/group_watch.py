"""End a worker whose group has failed while it was not in a collective.

A worker blocked outside TensorFlow's collectives (its input pipeline stuck, say) is never told by
an op that its peers gave up: the collective timeout fails the workers waiting in the all-reduce,
they exit, and the blocked one would wait forever (measured: still there after 400 s). So, while a
multi-worker run trains, a daemon thread watches the group every ``POLL_SECONDS``:

- on worker 0, which hosts TensorFlow's coordination service, it asks the service for every
  worker's state (as tf.distribute's ClusterCoordinator does): a worker that exited stops
  heartbeating and is reported unhealthy after ``runtime.heartbeat_timeout_seconds``;
- on the others, it checks that worker 0's port still accepts connections: when worker 0 exits,
  the service is gone and the group with it. (Not the service call itself: it holds Python's GIL
  while it waits, and with worker 0 frozen it waits for ever, freezing this worker with it.)

Once the group has failed, the main thread gets ``GRACE_SECONDS`` to end with its own error (it
usually has one: a collective aborted by the same fault); a worker still training after that
prints the one-line error and exits 75.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

from trainer.cluster import ClusterSpec
from trainer.contract import ExitCode

log = logging.getLogger(__name__)

#: How long the main thread may take to end by itself after the group failed (its own error, the
#: outcome push) before the watch ends the process.
GRACE_SECONDS = 5.0
#: How often the watch looks at the group.
POLL_SECONDS = 2.0
#: Consecutive failed looks at worker 0's port that mean it is gone (one may be a hiccup).
_LEADER_MISSES = 2


@contextlib.contextmanager
def watching_the_group(cluster: ClusterSpec) -> Iterator[None]:
    """While the block runs, a failed group ends this process with exit 75 (see the module docstring)."""
    if not cluster.is_multi_worker:
        yield
        return
    failure = _unhealthy_workers(cluster.num_workers) if cluster.is_chief else _leader_gone(cluster.workers[0])
    done = threading.Event()
    threading.Thread(target=_watch, args=(failure, done), name="group-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()  # training ended (or failed with its own error): the process ends its own way


def _watch(failure: Callable[[], str | None], done: threading.Event) -> None:
    while not done.wait(POLL_SECONDS):
        cause = failure()
        if cause is not None:
            return _end_unless_done(done, cause)
    return None


def _unhealthy_workers(num_workers: int) -> Callable[[], str | None]:
    """On worker 0: the workers its own coordination service reports unhealthy (a local call)."""
    from trainer import private_apis

    def check() -> str | None:
        states = private_apis.coordination_task_states(num_workers)
        unhealthy = [index for index, state in enumerate(states) if state]
        return f"the coordination service reports worker(s) {unhealthy} unhealthy" if unhealthy else None

    return check


def _leader_gone(leader: str) -> Callable[[], str | None]:
    """On the others: worker 0 (the coordination service's host) stopped accepting connections."""
    from trainer.rendezvous import probe

    misses = []

    def check() -> str | None:
        reason = probe(leader)
        misses[:] = [*misses, reason][-_LEADER_MISSES:] if reason else []
        return f"worker 0 at {leader} is gone: {reason}" if len(misses) == _LEADER_MISSES else None

    return check


def _end_unless_done(done: threading.Event, cause: str) -> None:
    log.info("the worker group failed: %s", cause)
    if done.wait(GRACE_SECONDS):
        return  # the main thread ended training with its own error in the meantime
    print(f"error: {failure_line(cause)}", file=sys.stderr, flush=True)
    os._exit(int(ExitCode.TRANSIENT))


def failure_line(cause: str) -> str:
    """The one line naming the fault and what to do."""
    return (
        f"the worker group failed while this worker was outside a collective ({cause}); "
        "a peer is gone or stuck: retry (the group resumes from its last backup)"
    )
