"""What a test's processes wrote, and the processes it started: for a test that runs out of time.

Every test has a time bound (pytest-timeout, ``timeout`` in pyproject.toml). A test over its
bound must say what its processes were doing and leave none of them behind, so:

- ``LogSink`` collects what the launcher or the job runner writes (``[worker-0] ...``,
  ``[flowers-0-abc12] ...`` lines) and registers itself for the running test;
- ``tails()`` gives the last lines of each process of the test's sinks, by prefix;
- the pytest process is a child subreaper (``become_subreaper``), so a worker whose parent
  died is re-parented to it rather than to init, and ``descendants()`` still finds it;
  tests/conftest.py kills the processes a test started when the test times out.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
from collections import defaultdict

_SINKS: list[LogSink] = []
_PREFIX = re.compile(r"^\[([^\]]+)\] ")


class LogSink:
    """Collects what the launcher or the job runner writes (they take any object with write/flush)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        _SINKS.append(self)

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.lines)


def forget_sinks() -> None:
    """A new test begins: the sinks of earlier tests are not its processes."""
    _SINKS.clear()


def tails(lines_per_process: int = 15) -> str:
    """The last lines of every process that wrote to this test's sinks, one block per process."""
    by_process: dict[str, list[str]] = defaultdict(list)
    for sink in _SINKS:
        for line in sink.text.splitlines():
            found = _PREFIX.match(line)
            by_process[found.group(1) if found else "(unprefixed)"].append(line)
    blocks = [
        f"--- last {min(len(lines), lines_per_process)} of {len(lines)} lines of {name}\n"
        + "\n".join(lines[-lines_per_process:])
        for name, lines in by_process.items()
    ]
    return "\n".join(blocks) or "(no process output was captured)"


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux prctl PR_SET_CHILD_SUBREAPER)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descendants(root: int | None = None) -> set[int]:
    """Pids of every live process below ``root`` (default: this process), from /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if fields[0] != "Z":
            children[int(fields[1])].append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill(pids: set[int]) -> list[int]:
    """SIGKILL each of ``pids`` that is still alive; the pids that were."""
    killed = []
    for pid in sorted(pids):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed
