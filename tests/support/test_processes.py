"""The suite's time bounds (tests/conftest.py): a test over its bound fails naming itself, shows its
processes' last lines and leaves none of them behind. Checked on a real inner pytest run."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

HANGING_TEST = '''
import subprocess, sys
import pytest
from tests.support.processes import LogSink

CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
with open(sys.argv[1], "w") as pids:
    pids.write(f"{os.getpid()} {grandchild.pid}")
for i in range(30):
    print(f"[worker-0] line {i}", flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(3)
def test_that_hangs():
    sink = LogSink()
    worker = subprocess.Popen([sys.executable, "-c", CHILD, "{pids}"], stdout=subprocess.PIPE, text=True)
    for line in worker.stdout:
        sink.write(line)
'''


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, not yet reaped
    except FileNotFoundError:
        return True


def test_a_test_over_its_bound_names_itself_shows_its_processes_and_kills_them(tmp_path):
    pids = tmp_path / "pids"
    (tmp_path / "test_hang.py").write_text(HANGING_TEST.replace("{pids}", str(pids)))
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403 - the suite's hooks\n")

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path / "test_hang.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip

    out = result.stdout
    assert result.returncode == 1, out[-3000:]
    assert "test_hang.py::test_that_hangs" in out and "Timeout" in out
    assert "[worker-0] line 29" in out and "[worker-0] line 15" in out  # the last 15 lines of the worker
    assert "[worker-0] line 14" not in out
    assert "killed the 2 process(es) this test started" in out
    child, grandchild = map(int, pids.read_text().split())
    assert _gone(child) and _gone(grandchild)  # the grandchild was in a session of its own
