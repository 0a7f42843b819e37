"""End-to-end training runs in real TensorFlow processes (tiny data, 32x32 inputs).

- a run killed mid-phase resumes from its backup without repeating finished epochs;
- bad runs fail with the documented exit codes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.support.training import TINY_RUN, set_args
from trainer.cluster import make_tf_config
from trainer.config import PrepareConfig
from trainer.contract import ExitCode
from trainer.data.prepare import prepare_dataset
from trainer.data.synthetic import make_demo_images
from trainer.launch import entrypoint_command, free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tiny")
    make_demo_images(str(root / "images"), classes=3, per_class=12, size=40, seed=1)
    cfg = PrepareConfig(validation_fraction=0.25, test_fraction=0.0, min_shards=4, processes=1)
    prepare_dataset(str(root / "images"), str(root / "dataset"), cfg, progress=lambda _: None)
    return str(root / "dataset")


def _settings(dataset: str, output: str, *extra: str) -> list[str]:
    return ["train", *set_args(*TINY_RUN, f"data.dataset={dataset}", f"output.dir={output}", *extra)]


def _start_worker(args: list[str], log_path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    return subprocess.Popen(entrypoint_command() + args, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _epochs_logged(metrics_log) -> list[tuple[str, int]]:
    if not metrics_log.exists():
        return []
    return [(row["phase"], row["epoch"]) for row in map(json.loads, metrics_log.read_text().splitlines())]


def test_stopped_run_resumes_from_its_backup_without_repeating_epochs(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    # Periodic backups only at epoch ends, so what survives a mid-epoch stop is the SIGTERM backup.
    args = _settings(tiny_dataset, str(output), "phases.fine_tuning.epochs=3", "train.backup_every_steps=4")
    metrics_log = output / "metrics.jsonl"

    first = _start_worker(args, tmp_path / "first.log")
    deadline = time.monotonic() + 240
    while ("fine_tuning", 1) not in _epochs_logged(metrics_log):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first run never reached fine-tuning epoch 1"
        time.sleep(0.2)
    time.sleep(1.5)  # into fine-tuning epoch 2
    first.send_signal(signal.SIGTERM)  # what Kubernetes sends before it kills a pod
    assert first.wait(timeout=60) == ExitCode.PREEMPTED
    first_log = (tmp_path / "first.log").read_text()
    assert re.search(r"SIGTERM \(here or on a peer\): backup written in [\d.]+ s at epoch \d, step \d", first_log), (
        first_log[-2000:]
    )

    second = _start_worker(args, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]

    second_log = (tmp_path / "second.log").read_text()
    assert "resuming after completed phase feature_extraction" in second_log
    assert _epochs_logged(metrics_log) == [
        ("feature_extraction", 1),
        ("fine_tuning", 1),
        ("fine_tuning", 2),
        ("fine_tuning", 3),
    ]
    state = json.loads((output / "state.json").read_text())
    assert state["complete"] is True
    assert list(state["phases"]) == ["feature_extraction", "fine_tuning"]

    # Restarting a finished run (e.g. a pod retried after success) changes nothing.
    before = metrics_log.read_text()
    again = subprocess.run(entrypoint_command() + args, capture_output=True, text=True)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert metrics_log.read_text() == before


def _run_cli(args: list[str], tf_config: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = tf_config
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_fewer_shards_than_workers_fails_before_waiting_for_peers(tiny_dataset, tmp_path):
    # Worker 0 of a 5-worker cluster whose peers never start: the shard check comes first.
    tf_config = make_tf_config([f"localhost:{port}" for port in free_ports(5)], 0)

    result = _run_cli(_settings(tiny_dataset, str(tmp_path / "run")), tf_config)

    assert result.returncode == ExitCode.DATA_ERROR
    line = _error_line(result)
    assert "has 4 shard(s) but the run has 5 workers" in line and "prepare.min_shards" in line


def test_backup_made_for_other_classes_is_refused(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "state.json").write_text(json.dumps({"class_names": ["cat", "dog"], "phases": {}, "complete": False}))

    result = _run_cli(_settings(tiny_dataset, str(output)))

    assert result.returncode == ExitCode.DATA_ERROR
    assert "was made for classes ['cat', 'dog']" in _error_line(result)
