"""End-to-end training runs in real TensorFlow processes (tiny data, 32x32 inputs).

- bad runs fail with the documented exit codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.training import TINY_RUN, make_tiny_dataset, set_args
from trainer.cluster import make_tf_config
from trainer.contract import ExitCode
from trainer.launch import free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _settings(dataset: str, output: str, *extra: str) -> list[str]:
    return ["train", *set_args(*TINY_RUN, f"data.dataset={dataset}", f"output.dir={output}", *extra)]


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
