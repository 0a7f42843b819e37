"""trainer.signals: one owner of SIGTERM/SIGINT, handlers stacked, real signals sent to this process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from trainer import signals
from trainer.errors import Preempted


def send_sigterm_to_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary of the main thread


def test_the_newest_handler_gets_the_signal_and_leaving_gives_it_back_to_the_one_below():
    seen: list[str] = []
    before = signal.getsignal(signal.SIGTERM)

    with signals.stop_requests(lambda _: seen.append("outer")):
        with signals.stop_requests(lambda _: seen.append("inner")):
            send_sigterm_to_self()
        send_sigterm_to_self()

    assert seen == ["inner", "outer"]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler from before this module is back


def test_a_handler_uninstalled_out_of_order_leaves_the_others_in_place():
    seen: list[str] = []
    first = signals.stop_requests(lambda _: seen.append("first")).install()
    second = signals.stop_requests(lambda _: seen.append("second")).install()

    first.uninstall()
    send_sigterm_to_self()
    second.uninstall()
    second.uninstall()  # twice does nothing

    assert seen == ["second"]


def test_sigterm_raises_preempted_under_the_commands_handler():
    with pytest.raises(Preempted, match="received SIGTERM"), signals.preempt_on_sigterm():
        send_sigterm_to_self()


def test_a_deferred_stop_reaches_the_handler_below_when_the_block_ends():
    steps: list[str] = []

    with pytest.raises(Preempted), signals.preempt_on_sigterm():
        with signals.deferred_stop():
            send_sigterm_to_self()
            steps.append("the block finished")  # not cut off by the signal
        steps.append("after the block")  # never: Preempted is raised as the block ends

    assert steps == ["the block finished"]


def test_a_deferred_ctrl_c_is_a_keyboard_interrupt_after_the_block():
    with pytest.raises(KeyboardInterrupt), signals.deferred_stop():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


def _wait_for_sigterm(ready) -> None:
    with signals.preempt_on_sigterm():  # what a forked pool worker inherits from the CLI
        signals.reset_in_worker()
        ready.set()
        time.sleep(30)


def test_a_pool_worker_ends_on_sigterm_whatever_its_parent_installed():
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_wait_for_sigterm, args=(ready,))
    worker.start()
    assert ready.wait(10)

    worker.terminate()  # SIGTERM, as multiprocessing.Pool stops its workers
    worker.join(10)

    assert worker.exitcode == -signal.SIGTERM


def test_a_handler_installed_behind_the_dispatchers_back_is_taken_back():
    # TensorFlow's coordination service installs its own SIGTERM handler when
    # MultiWorkerMirroredStrategy starts (preemption_notifier.cc); a stop check installed after
    # it must still get the signal, and reclaim() takes it back for the handlers already there.
    got = []
    with signals.stop_requests(lambda signum: got.append(("bottom", signum))):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what native code does with sigaction
        signals.reclaim()
        os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with signals.stop_requests(lambda signum: got.append(("top", signum))):
            os.kill(os.getpid(), signal.SIGTERM)

    assert got == [("bottom", signal.SIGTERM), ("top", signal.SIGTERM)]
