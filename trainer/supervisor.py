"""Child processes as a container runtime treats them: one process group each, SIGTERM, a grace, SIGKILL.

The one process supervisor of the local tools: `trainer launch` (trainer.launch: N workers),
the job runner (trainer.jobrunner.runner: one process per pod) and the bench
(trainer.bench: measured trainer runs and its own worker processes). What it does, and why:

- **A process group per child** (a new session): a container's processes end together, so the
  SIGKILL that ends a child goes to its whole group, and nothing it started outlives it.
- **SIGTERM to the main process only**, as the kubelet sends it to a container's PID 1: the
  trainer decides how its own children stop (trainer.signals describes the chain).
- **A grace period**, then SIGKILL to the group: :meth:`Child.terminate` sets the deadline,
  :meth:`Child.enforce_grace` (polled by the caller's loop) or :meth:`Child.wait` keeps it.
- **Exit codes** both ways: ``returncode`` as Popen gives it (-N for a death by signal N) and
  ``exit_code`` as Kubernetes reports a container's (128+N).
- **Output** read from one pipe (stdout and stderr together) by a thread: raw chunks for callers
  that time what a child prints, whole lines (universal newlines, undecodable bytes replaced) for
  prefixed logs, and optionally a log file.
- **Resource usage**: the child is reaped with ``wait4``, so its peak memory is known.

Nothing here decides *when* to stop a child; the callers' policies do (the launcher's, the
Job controller's in trainer.jobrunner.controller, the bench's time limits).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

OnLine = Callable[[str], None]
OnChunk = Callable[[bytes], None]

#: How long a child's other processes may take to go once its main process has exited and the group got SIGKILL.
GROUP_EXIT_SECONDS = 5.0


class Child:
    """One child process in its own process group, with its output pumped by a thread.

    ``on_line`` gets every complete line (ending in "\\n"), ``on_chunk`` every raw read, and
    ``log_path`` (if given) every byte. ``stdin`` is /dev/null unless given.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        on_line: OnLine | None = None,
        on_chunk: OnChunk | None = None,
        log_path: str | None = None,
        stdin: Any = subprocess.DEVNULL,
    ):
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.proc = subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the child's processes end together
        )
        self.pid = self.proc.pid
        self.returncode: int | None = None
        self.rusage: Any = None  # resource.struct_rusage once reaped
        self.ended: float | None = None  # time.monotonic() when reaped
        self.terminated_at: float | None = None  # when SIGTERM was sent
        self.kill_at: float | None = None  # SIGKILL to the group from then on (None: not scheduled)
        self.killed = False  # SIGKILL was sent to the group
        self.timed_out = False  # wait() gave up on it
        self._pump = threading.Thread(
            target=_pump_output,
            args=(self.proc.stdout, on_line, on_chunk, log_path),
            name=f"output-{self.pid}",
            daemon=True,
        )
        self._pump.start()

    # --- state ---------------------------------------------------------------------------------

    def poll(self) -> int | None:
        """The returncode once the main process has exited (it is reaped here), else None."""
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    @property
    def running(self) -> bool:
        return self.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The container convention: the process's exit status, or 128+N after a death by signal N."""
        code = self.poll()
        return None if code is None else container_exit_code(code)

    def group_alive(self) -> bool:
        """Whether the child's process group still has a process that is not a zombie."""
        return group_alive(self.pid)

    # --- stopping ------------------------------------------------------------------------------

    def send(self, sig: int) -> None:
        """``sig`` to the main process only (as the kubelet's SIGTERM reaches a container's PID 1)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self, grace_seconds: float | None) -> None:
        """SIGTERM now (the first time), SIGKILL to the group once ``grace_seconds`` have passed.

        ``None``: no deadline (only :meth:`kill` ends it). A later call never extends the deadline.
        """
        if self.returncode is not None:
            return
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
            self.send(signal.SIGTERM)
        if grace_seconds is not None:
            self.kill_at = min(self.kill_at or float("inf"), time.monotonic() + grace_seconds)

    def enforce_grace(self, now: float | None = None) -> bool:
        """SIGKILL the group if its deadline has passed; whether that happened now."""
        if self.kill_at is None or self.returncode is not None:
            return False
        if (now if now is not None else time.monotonic()) < self.kill_at:
            return False
        self.kill()
        return True

    def kill(self) -> None:
        """SIGKILL to the whole process group (safe in a signal handler: it reaps nothing)."""
        self.kill_at = None
        self.killed = self.killed or self.returncode is None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None, grace_seconds: float = 0.0) -> int:
        """Wait for the child; past ``timeout``: SIGTERM, SIGKILL after ``grace_seconds``. The returncode.

        If the wait itself is interrupted (Ctrl-C, an error), the group is killed before the
        exception goes on: a child never outlives the caller that waits for it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.poll() is None:
                if deadline is not None and time.monotonic() >= deadline:
                    self.timed_out = True
                    self.terminate(grace_seconds)
                    self.enforce_grace()
                time.sleep(0.05)
        except BaseException:
            self.kill()
            self._reap(0)
            raise
        return self.returncode

    def end_group(self, timeout: float = GROUP_EXIT_SECONDS) -> None:
        """After the main process exited: SIGKILL what is left of its group, wait until it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def join_output(self, timeout: float = 5.0) -> None:
        """Wait until the output pump has passed on everything the child wrote."""
        self._pump.join(timeout)

    def _reap(self, options: int) -> None:
        try:
            pid, status, usage = os.wait4(self.pid, options)
        except ChildProcessError:  # reaped elsewhere: Popen knows the code
            pid, status, usage = self.pid, None, None
        if not pid:
            return
        code = os.waitstatus_to_exitcode(status) if status is not None else self.proc.wait()
        self.proc.returncode = code  # so Popen never waits for a pid that is gone
        self.rusage, self.ended, self.returncode = usage, time.monotonic(), code


def container_exit_code(returncode: int) -> int:
    """Popen's -N (killed by signal N) as a container's exit code 128+N; other codes unchanged."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``exit code 65`` or ``killed by SIGKILL`` (Popen gives -N for a death by signal N)."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a process that is not a zombie (Linux /proc)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _pump_output(stream: BinaryIO, on_line: OnLine | None, on_chunk: OnChunk | None, log_path: str | None) -> None:
    lines = _LineSplitter(on_line) if on_line else None
    log = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed below, after the last chunk
    try:
        while chunk := os.read(stream.fileno(), 65536):
            if log is not None:
                log.write(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
            if lines is not None:
                lines.feed(chunk)
        if lines is not None:
            lines.close()
    finally:
        stream.close()
        if log is not None:
            log.close()


class _LineSplitter:
    """Bytes in, complete lines out: UTF-8 (bad bytes replaced), "\\r\\n" and "\\r" read as "\\n"."""

    def __init__(self, on_line: OnLine):
        self.on_line = on_line
        self._decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")("replace"), translate=True)
        self._partial = ""

    def feed(self, chunk: bytes) -> None:
        self._emit(self._decoder.decode(chunk))

    def close(self) -> None:
        self._emit(self._decoder.decode(b"", final=True))
        if self._partial:
            self.on_line(self._partial + "\n")  # a last line without its newline still counts
            self._partial = ""

    def _emit(self, text: str) -> None:
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            self.on_line(line + "\n")
