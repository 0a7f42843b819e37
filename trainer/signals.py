"""The one owner of this process's SIGTERM and SIGINT handlers, and the description of the whole stop chain.

The chain, from whoever asks to whoever stops:

1. **Who asks.** On Kubernetes the kubelet sends SIGTERM to the container's main process (the
   `trainer` entrypoint) when a pod is deleted, evicted or preempted, then SIGKILL after
   ``terminationGracePeriodSeconds``. Locally `trainer launch` and the job runner
   (trainer.jobrunner) do the same to their workers through :mod:`trainer.supervisor`; the
   launcher itself receives SIGTERM or Ctrl-C (SIGINT) from the user and passes it on: a
   :func:`stop_requests` handler (trainer.launch) tells every worker once, kills them when asked
   a second time.
2. **The process.** ``trainer.cli.main`` runs every command inside :func:`preempt_on_sigterm`:
   SIGTERM raises ``trainer.errors.Preempted`` wherever the main thread is, and
   ``trainer.exits`` turns it into exit 76 (PREEMPTED: restart, no retry budget spent). Ctrl-C
   raises KeyboardInterrupt, mapped to the same code.
3. **Training.** While a phase trains, its stop check (trainer.train.callbacks.StopRequest, a
   :func:`stop_requests` handler installed around the phase's fits) stands above that one and only
   notes the signal: the step in progress finishes, the workers agree at a step that someone was
   asked to stop (an all-reduce), write one backup together and raise Preempted, so the run exits
   76 and resumes from that backup. TensorFlow's coordination service replaces the process's
   SIGTERM handler with its own when MultiWorkerMirroredStrategy starts (see :func:`reclaim`):
   the worker takes it back right after building the strategy, and every install does too.
4. **Prepare.** `trainer prepare` checks and encodes images in a pool of worker processes:
   :func:`reset_in_worker` gives each the default SIGTERM (the pool stops its workers with
   SIGTERM; the CLI's handler must not run there). The parent writes a shard and its progress
   record inside :func:`deferred_stop`, so a SIGTERM lands before or after the pair, never
   between; then Preempted names the shards kept, and a re-run resumes from them.

How the handlers stack: this module installs one dispatcher per signal and keeps a stack of
handlers; the newest handler gets the signal. Leaving a block pops its handler (also out of
order); when the stack is empty the handler that was there before comes back. Python runs
signal handlers only in the main thread, so outside it every block here does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from trainer.errors import Preempted

#: The signals that ask a process to stop: Kubernetes' and the launcher's SIGTERM, a user's Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

OnStop = Callable[[int], None]

_stacks: dict[int, list[StopHandler]] = {}
_before: dict[int, Any] = {}  # each signal's handler before the first push (restored when the stack empties)


class StopHandler:
    """``on_stop(signum)`` for ``signals`` while installed: a context manager, or install()/uninstall().

    Installing pushes it on top of the stack (it gets the signal, the handlers below do not);
    uninstalling removes it wherever it is. Both may be called again: a second install or
    uninstall does nothing.
    """

    def __init__(self, on_stop: OnStop, signals: Sequence[int] = (signal.SIGTERM,)):
        self.on_stop = on_stop
        self.signals = tuple(signals)
        self.installed = False

    def install(self) -> StopHandler:
        if self.installed or not _in_main_thread():
            return self
        for signum in self.signals:
            stack = _stacks.setdefault(signum, [])
            previous = signal.signal(signum, _dispatch)  # every time: see reclaim()
            if not stack:
                _before[signum] = previous
            stack.append(self)
        self.installed = True
        return self

    def uninstall(self) -> None:
        if not self.installed:
            return
        self.installed = False
        for signum in self.signals:
            stack = _stacks.get(signum, [])
            if self in stack:
                stack.remove(self)
            if not stack and signum in _before:
                signal.signal(signum, _before.pop(signum))

    def __enter__(self) -> StopHandler:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.uninstall()


def reclaim() -> None:
    """Take the stop signals back from native code that replaced the dispatcher.

    When MultiWorkerMirroredStrategy starts, TensorFlow's coordination service installs its own
    C++ SIGTERM handler (``preemption_notifier.cc``: "SIGTERM caught", and nothing else for a
    trainer that does not use PreemptionCheckpointHandler), which silently replaces Python's.
    Every install() takes the signal back; the worker also calls this once the strategy is built.
    """
    if not _in_main_thread():
        return
    for signum, stack in _stacks.items():
        if stack:
            signal.signal(signum, _dispatch)


def stop_requests(on_stop: OnStop, signals: Sequence[int] = (signal.SIGTERM,)) -> StopHandler:
    """A handler that calls ``on_stop(signum)`` instead of the ones below it (``with`` it, or install())."""
    return StopHandler(on_stop, signals)


def preempt_on_sigterm() -> StopHandler:
    """The command's own handler, at the bottom of the stack: SIGTERM raises Preempted (exit 76)."""
    return StopHandler(_raise_preempted, (signal.SIGTERM,))


def _raise_preempted(signum: int) -> None:
    # Kubernetes sends SIGTERM before killing a pod. The run resumes from its last backup.
    raise Preempted("received SIGTERM; stopping (the run resumes from its last backup when restarted)")


@contextlib.contextmanager
def deferred_stop(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """A stop signal during the block waits until the block is done; then the handler below gets it.

    A handler, not a signal mask: with threads in this process (a pool's), a signal the main
    thread blocks is taken by another thread, and Python still runs the handler here.
    """
    received: list[int] = []
    try:
        with StopHandler(received.append, signals):
            yield
    finally:
        if received:
            deliver(received[0])  # also when the block failed: the stop request is what counts


def deliver(signum: int) -> None:
    """Handle ``signum`` now as this process would: the top handler, else the one from before this module."""
    stack = _stacks.get(signum)
    if stack:
        stack[-1].on_stop(signum)
        return
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)  # e.g. Python's own SIGINT handler: KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action (for SIGTERM: the process ends)


def reset_in_worker() -> None:
    """For a pool's forked worker (its initializer): the default SIGTERM, none of the parent's handlers.

    The pool stops its workers with SIGTERM; the parent's handlers (Preempted, a stop flag) would
    only keep a worker alive or raise in it.
    """
    _stacks.clear()
    _before.clear()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dispatch(signum: int, frame: FrameType | None) -> None:
    deliver(signum)


def _in_main_thread() -> bool:
    # Handlers can only be changed (and only run) in the main thread.
    return threading.current_thread() is threading.main_thread()
