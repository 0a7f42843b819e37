"""trainer.supervisor: real child processes, their process groups, grace periods, exit codes and output."""

from __future__ import annotations

import signal
import sys
import time

from trainer.supervisor import Child, container_exit_code, describe_exit, group_alive

# A child that starts a grandchild in its process group, prints both pids, then does as told.
PARENT = """
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
grandchild = subprocess.Popen([sys.executable, "-c", stubborn])
print("pids", os.getpid(), grandchild.pid, flush=True)
if sys.argv[1] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
if sys.argv[1] == "exit-on-sigterm":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(76))
    time.sleep(60)
sys.exit(int(sys.argv[1]))
"""


def start(behaviour: str, lines: list[str]) -> Child:
    child = Child([sys.executable, "-c", PARENT, behaviour], on_line=lines.append)
    deadline = time.monotonic() + 20
    while not any(line.startswith("pids") for line in lines):
        assert time.monotonic() < deadline, "the child never printed its pids"
        time.sleep(0.02)
    return child


def test_sigterm_goes_to_the_main_process_and_its_code_is_kept():
    lines: list[str] = []
    child = start("exit-on-sigterm", lines)

    child.terminate(grace_seconds=30)
    code = child.wait(timeout=20)

    assert code == 76 and not child.killed
    assert group_alive(child.pid)  # the grandchild ignores SIGTERM and got none anyway
    child.end_group()  # what the job runner does once a pod's main process exited
    assert not group_alive(child.pid)


def test_a_child_that_ignores_sigterm_is_killed_with_its_group_after_the_grace():
    lines: list[str] = []
    child = start("ignore-sigterm", lines)
    started = time.monotonic()

    child.terminate(grace_seconds=0.5)
    while child.running:
        child.enforce_grace()
        time.sleep(0.05)

    assert 0.5 <= time.monotonic() - started < 10
    assert child.killed and child.returncode == -signal.SIGKILL and child.exit_code == 128 + signal.SIGKILL
    deadline = time.monotonic() + 5
    while group_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not group_alive(child.pid)  # the grandchild went with it


def test_a_wait_past_its_timeout_kills_the_child_and_says_so():
    child = Child([sys.executable, "-c", "import time; time.sleep(60)"])

    code = child.wait(timeout=0.5)

    assert child.timed_out and code in (-signal.SIGTERM, -signal.SIGKILL)
    assert child.rusage.ru_maxrss > 0  # reaped with wait4: its peak memory is known


def test_output_is_passed_on_as_lines_raw_chunks_and_a_log_file(tmp_path):
    lines: list[str] = []
    chunks: list[bytes] = []
    script = r"import sys; sys.stdout.buffer.write(b'one\r\ntwo\rthree\n\xff bad\nlast without newline')"
    log = tmp_path / "log"
    child = Child([sys.executable, "-c", script], on_line=lines.append, on_chunk=chunks.append, log_path=log)

    assert child.wait(timeout=20) == 0
    child.join_output()

    assert lines == ["one\n", "two\n", "three\n", "\ufffd bad\n", "last without newline\n"]
    assert b"".join(chunks) == log.read_bytes() == b"one\r\ntwo\rthree\n\xff bad\nlast without newline"


def test_exit_codes_read_as_kubernetes_and_people_read_them():
    assert [container_exit_code(code) for code in (0, 65, -signal.SIGTERM)] == [0, 65, 143]
    assert describe_exit(65) == "exit code 65"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
