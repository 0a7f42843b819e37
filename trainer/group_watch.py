"""End a worker whose group has failed while it was not in a collective.

A worker blocked outside TensorFlow's collectives (its input pipeline stuck, say) is never told by
an op that its peers gave up: the collective timeout fails the workers waiting in the all-reduce,
they exit, and the blocked one would wait forever (measured: still there after 400 s). TensorFlow's
coordination service knows, though: a worker that left stops heartbeating, and when its host
(worker 0) is the one that left, the service is unreachable. So, while a multi-worker run trains,
a daemon thread asks the service for every worker's state every ``POLL_SECONDS`` (as
tf.distribute's ClusterCoordinator does). Once a worker is unhealthy or the service is gone, the
main thread gets ``GRACE_SECONDS`` to end with its own error (it usually has one: a collective
aborted by the same fault); a worker still training after that prints the one-line error and
exits 75.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator

from trainer.contract import ExitCode
from trainer.errors import tf_error_summary

log = logging.getLogger(__name__)

#: How long the main thread may take to end by itself after the group failed (its own error, the
#: outcome push) before the watch ends the process.
GRACE_SECONDS = 5.0
#: How often the watch asks the coordination service about the group: a share of the bound.
POLL_SECONDS = 2.0


@contextlib.contextmanager
def watching_the_group(num_workers: int) -> Iterator[None]:
    """While the block runs, a failed group ends this process with exit 75 (see the module docstring)."""
    if num_workers < 2:
        yield
        return
    done = threading.Event()
    threading.Thread(target=_watch, args=(num_workers, done), name="group-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()  # training ended (or failed with its own error): the process ends its own way


def _watch(num_workers: int, done: threading.Event) -> None:
    import tensorflow as tf

    from trainer import private_apis

    while not done.wait(POLL_SECONDS):
        try:
            states = private_apis.coordination_task_states(num_workers)
        except tf.errors.OpError as err:  # the service unreachable: its host (worker 0) is gone
            return _end_unless_done(done, f"{type(err).__name__}: {tf_error_summary(str(err))}")
        unhealthy = [index for index, state in enumerate(states) if state]
        if unhealthy:
            return _end_unless_done(done, f"the coordination service reports worker(s) {unhealthy} unhealthy")
    return None


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
