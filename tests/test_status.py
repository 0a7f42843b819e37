"""`trainer status`: a real local run's metrics read and summarised (--metrics-url direct mode),
and the cluster mode's error without a kubeconfig. The cluster mode's pod-proxy reads need an API
server, which this machine cannot have (docs/helm.md, "Following a run")."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.training import TINY_RUN, make_tiny_dataset, set_args
from trainer import metrics
from trainer.contract import ExitCode
from trainer.status import parse, read_url, value

#: Long enough to be read while it trains (2 workers share the 2 cores): 3 x 40 steps.
RUN = [*TINY_RUN, "train.steps_per_epoch=40", "train.backup_every_steps=5"]


def trainer(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """A running `trainer launch --workers 2`: the workers' metrics URLs, once a backup exists."""
    root = tmp_path_factory.mktemp("status")
    dataset = make_tiny_dataset(root)
    log = open(root / "launch.log", "w+")  # noqa: SIM115 - read while the run writes it
    dirs = set_args(f"data.dataset={dataset}", f"output.dir={root / 'run'}", *RUN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "launch", "--workers", "2", *dirs],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        urls = _wait_for_backup(proc, root / "launch.log")
        yield urls
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def _wait_for_backup(proc: subprocess.Popen, log_path, timeout: float = 180) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = dict(re.findall(r"\[worker-(\d)\] .*metrics on (http://\S+/metrics)", log_path.read_text()))
        if len(found) == 2:
            urls = [found["0"], found["1"]]
            if value(parse(read_url(urls[0])), metrics.BACKUP_LAST_SUCCESS):
                return urls
        time.sleep(1)
    raise AssertionError(f"the run did not get to its first backup:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_status_reads_a_running_local_training(training):
    proc = trainer("status", "--metrics-url", training[0], "--metrics-url", training[1], "--sample-seconds", "3")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^phase: (feature_extraction|fine_tuning)$", out, re.M), out
    step = re.search(r"^epoch (\d), step (\d+) of 120 \((\d+)%\)$", out, re.M)
    assert step and 0 < int(step.group(2)) <= 120, out
    rates = re.search(r"^images/s: worker 0 ([\d.]+), worker 1 ([\d.]+)$", out, re.M)
    assert rates and float(rates.group(1)) > 0 and float(rates.group(2)) > 0, out  # both train
    assert re.search(r"^loss/accuracy: train loss [\d.]+ acc [\d.]+", out, re.M), out
    assert re.search(r"^ETA: \d+m\d\ds$", out, re.M), out
    assert re.search(r"^last backup: \dm\d\ds ago$", out, re.M), out
    assert "restarts: 0 (group restarts of the run)" in out


@pytest.mark.slow
def test_status_watch_refreshes_until_stopped(training):
    cmd = [sys.executable, "-m", "trainer", "status", "--metrics-url", training[0], "--watch"]
    proc = subprocess.Popen([*cmd, "--interval", "1", "--sample-seconds", "1"], stdout=subprocess.PIPE, text=True)
    time.sleep(6)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)

    assert proc.returncode == 0  # Ctrl-C ends a watch
    assert len(re.findall(r"^--- \d\d:\d\d:\d\d$", out, re.M)) >= 2, out
    assert out.count("images/s: worker 0 ") >= 2, out


def test_status_without_a_kubeconfig_says_how_to_give_one(tmp_path):
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing")}
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "status", "flowers"], capture_output=True, text=True, timeout=60, env=env
    )

    assert proc.returncode == ExitCode.CONFIG_ERROR
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot load your kubeconfig") and "set KUBECONFIG or --context" in line


def test_status_on_a_url_nothing_serves_is_a_transient_error():
    proc = trainer("status", "--metrics-url", "http://127.0.0.1:9/metrics", "--sample-seconds", "0")

    assert proc.returncode == ExitCode.TRANSIENT
    assert "cannot read http://127.0.0.1:9/metrics" in proc.stderr
