"""A pod for the liveness-probe tests: the trainer's real metrics endpoint, then a chosen way of being stuck.

``python healthz_pod.py MODE PORT``: serves trainer.metrics on 0.0.0.0:PORT (the endpoint whose
/healthz the chart's probe asks, in its own thread, as in the trainer), notes SIGTERM without
stopping (as the trainer's stop check does during training: a stuck step never reaches the
check), prints ``stuck: MODE`` and then, in the main thread:

- ``idle``: sleeps in short naps (a healthy process; tests freeze it with SIGSTOP);
- ``python-spin``: a pure-Python busy loop (holds the GIL, but the interpreter hands it over
  every ``sys.getswitchinterval()`` seconds);
- ``c-holding-gil``: a C call that blocks without releasing the GIL (libc ``sleep`` through
  ``ctypes.PyDLL``, as a C extension that never calls ``Py_BEGIN_ALLOW_THREADS`` would);
- ``c-releasing-gil``: the same C call with the GIL released (``ctypes.CDLL``), as TensorFlow's
  ops, file and socket reads release it: a deadlock in C++ code looks like this;
- ``tf-blocked``: a real TensorFlow op that never returns (dequeue from an empty FIFOQueue).
"""

from __future__ import annotations

import ctypes
import functools
import signal
import sys
import time
from collections.abc import Callable

from trainer import metrics


def _note_sigterm(signum, frame) -> None:
    print("SIGTERM noted", flush=True)


def _idle() -> None:
    while True:
        time.sleep(0.05)


def _spin() -> None:
    n = 0
    while True:
        n += 1


def _sleep_in_c(libc: ctypes.CDLL) -> None:
    while True:
        libc.sleep(3600)  # a signal ends one sleep early; the loop starts the next


def _stuck_call(mode: str) -> Callable[[], object]:
    """What gets stuck, ready to call (TensorFlow imported and its queue built before)."""
    if mode == "idle":
        return _idle
    if mode == "python-spin":
        return _spin
    if mode == "c-holding-gil":
        return functools.partial(_sleep_in_c, ctypes.PyDLL(None))
    if mode == "c-releasing-gil":
        return functools.partial(_sleep_in_c, ctypes.CDLL(None))
    if mode == "tf-blocked":
        import tensorflow as tf

        return tf.queue.FIFOQueue(1, tf.int32).dequeue
    raise SystemExit(f"unknown mode {mode!r}")


def main(mode: str, port: int) -> None:
    signal.signal(signal.SIGTERM, _note_sigterm)
    endpoint = metrics.serve(metrics.TrainerMetrics(), port, "0.0.0.0")
    if endpoint is None:
        raise SystemExit(f"cannot listen on port {port}")
    call = _stuck_call(mode)
    print(f"stuck: {mode}", flush=True)
    call()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
