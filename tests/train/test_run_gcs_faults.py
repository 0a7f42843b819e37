"""Storage faults during a run on gs:// (a real GCS emulator): clear errors, right exit codes."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from trainer.config import set_args
from trainer.contract import ExitCode
from trainer.data.synthetic import make_demo_images
from trainer.launch import entrypoint_command

pytestmark = pytest.mark.slow

RUN = [
    "model.weights=none",
    "model.head.dense_units=[8]",
    "data.image_size=32",
    "train.batch_size_per_replica=4",
    "train.steps_per_epoch=4",
    "train.backup_every_steps=2",
    "phases.feature_extraction.epochs=2",
    "phases.fine_tuning.epochs=0",
    "runtime.verbose=0",
]


@pytest.fixture
def dataset(gcs_bucket, gcs_env, tmp_path) -> str:
    images = tmp_path / "images"
    make_demo_images(str(images), classes=2, per_class=12, size=40, seed=5)
    uri = f"gs://{gcs_bucket}/data"
    done = subprocess.run([*entrypoint_command(), "prepare", str(images), uri, "--set", "prepare.min_shards=4"],
                          capture_output=True, text=True, env=gcs_env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return uri


def _train(env: dict, *settings: str) -> subprocess.Popen:
    args = ["train", *set_args(*RUN, *settings)]
    return subprocess.Popen([*entrypoint_command(), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def test_an_unwritable_output_fails_at_once_naming_identity_and_role(gcs, gcs_bucket, gcs_env, dataset):
    gcs.deny(403, methods=["POST"], path_contains=f"/b/{gcs_bucket}/o")  # no uploads to the bucket
    started = time.monotonic()

    out, _ = _train(gcs_env, f"data.dataset={dataset}", f"output.dir=gs://{gcs_bucket}/run").communicate(timeout=120)

    assert time.monotonic() - started < 60  # before any TensorFlow cluster work, no retries
    line = _error_line(out)
    assert re.match(
        rf"error: output.dir: permission denied to write gs://{gcs_bucket}/run/\.probe-worker-0-\w+ as anonymous", line
    )
    assert "roles/storage.objectUser" in line and "test-token" not in out


def test_a_shard_truncated_after_prepare_is_refused_before_training(gcs, gcs_bucket, gcs_env, dataset):
    name = "data/train-00002-of-00004.tfrecord"
    data = gcs.get_object(gcs_bucket, name)
    gcs.put_object(gcs_bucket, name, data[: len(data) // 2])

    run = _train(gcs_env, f"data.dataset={dataset}", f"output.dir=gs://{gcs_bucket}/run")
    out, _ = run.communicate(timeout=120)

    assert run.returncode == ExitCode.DATA_ERROR, out[-3000:]
    line = _error_line(out)
    cut = len(data) // 2
    assert f"shard gs://{gcs_bucket}/{name} has {cut} bytes but the manifest says {len(data)}" in line
    assert not gcs.client().bucket(gcs_bucket).blob("run/metrics.jsonl").exists()


def test_a_shard_deleted_mid_run_is_a_clear_data_error(gcs, gcs_bucket, gcs_env, dataset):
    run = _train(gcs_env, f"data.dataset={dataset}", f"output.dir=gs://{gcs_bucket}/run")
    output = []
    for line in run.stdout:  # training has started: validation shards are opened after epoch 1
        output.append(line)
        if "phase feature_extraction:" in line:
            gcs.delete_object(gcs_bucket, "data/validation-00001-of-00004.tfrecord")
            break
    rest, _ = run.communicate(timeout=180)
    out = "".join(output) + rest

    assert run.returncode == ExitCode.DATA_ERROR, out[-3000:]
    line = _error_line(out)
    assert line.startswith("error: a file is missing") and "validation-00001-of-00004.tfrecord" in line


def test_a_worker_killed_while_writing_a_backup_restarts_from_the_previous_complete_one(
    gcs, gcs_bucket, gcs_env, dataset
):
    marker = "run/backup/feature_extraction/chief/checkpoint"
    settings = (f"data.dataset={dataset}", f"output.dir=gs://{gcs_bucket}/run")
    first = _train(gcs_env, *settings)
    deadline = time.monotonic() + 180
    while not gcs.client().bucket(gcs_bucket).blob(marker).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.1)
    # Hold every later backup write, so the next backup is caught half-written; then kill the worker.
    gcs.delay_next(1000, seconds=4, methods=["POST", "PUT"], path_contains="backup")
    time.sleep(6)
    first.send_signal(signal.SIGKILL)
    first.wait()
    committed = gcs.client().bucket(gcs_bucket).blob(marker).download_as_text()
    time.sleep(5)  # held requests drain (GCS would apply them too)
    gcs.reset()

    second = _train(gcs_env, *settings)
    out, _ = second.communicate(timeout=240)

    assert 'model_checkpoint_path: "ckpt-1"' in committed  # the half-written ckpt-2 was never committed
    assert second.returncode == ExitCode.OK, out[-3000:]
    assert gcs.client().bucket(gcs_bucket).blob("run/summary.json").exists()


@pytest.mark.parametrize("command", ["train", "launch"])
def test_a_bucket_that_does_not_exist_is_a_config_error_naming_it(gcs, gcs_bucket, gcs_env, dataset, command):
    missing = f"{gcs_bucket}-typo"
    args = [command, *(["--workers", "2"] if command == "launch" else []), *set_args(*RUN)]
    outputs = {
        "output.dir": [f"data.dataset={dataset}", f"output.dir=gs://{missing}/run"],
        "data.dataset": [f"data.dataset=gs://{missing}/data", f"output.dir=gs://{gcs_bucket}/run"],
    }

    for setting, settings in outputs.items():
        done = subprocess.run([*entrypoint_command(), *args, *set_args(*settings)], env=gcs_env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

        assert done.returncode == ExitCode.CONFIG_ERROR, done.stdout[-3000:] + done.stderr[-3000:]
        # launch: the failed worker's line, prefixed [worker-i] (its peer may be stopped before it says it too)
        lines = [re.sub(r"^\[worker-\d+\] ", "", line) for line in (done.stdout + done.stderr).splitlines()]
        named = rf"error: (output.dir: )?bucket {missing} does not exist \(gs://{missing}/"
        errors = [line for line in lines if re.match(named, line)]
        assert errors if command == "launch" else [_error_line(done.stderr)] == errors, (setting, lines[-20:])
        assert all("check the bucket name in output.dir / data.dataset" in line for line in errors)
