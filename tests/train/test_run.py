"""End-to-end training runs in real TensorFlow processes (tiny data, 32x32 inputs).

- bad runs fail with the documented exit codes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from tests.support.training import TINY_RUN, cut_after_records, make_tiny_dataset, merge_last_two_records, set_args
from trainer.cluster import make_tf_config
from trainer.contract import LEASE_FILE, ExitCode
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


# --------------------------------------------------------------------------- early stopping across a restart

#: Fine-tuning at a learning rate too small to move any float32 weight: every epoch scores the
#: same, none beats the frozen phase, so early stopping ends the phase after `patience` epochs
#: whatever order the batches come in (a restarted run sees them in another order).
EARLY_STOPPING = [
    "runtime.deterministic=true",
    "phases.fine_tuning.epochs=6",
    "phases.fine_tuning.early_stopping_patience=2",
    "phases.fine_tuning.optimizer.learning_rate=1e-30",
]


def _checkpoint_path(backup_dir) -> str | None:
    marker = backup_dir / "chief" / "checkpoint"
    return marker.read_text().splitlines()[0] if marker.exists() else None


def _fine_tuning_rows(output) -> list[dict]:
    path = output / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [row for row in rows if row["phase"] == "fine_tuning"]


def _kill_in_the_second_fine_tuning_epoch(args: list[str], output) -> None:
    """Start a run; SIGKILL it after the first mid-epoch backup of fine-tuning epoch 2."""
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    backups, seen = output / "backup" / "fine_tuning", []
    try:
        while proc.poll() is None and len(seen) < 2:
            if _fine_tuning_rows(output):  # epoch 1 ended: its end backup, then step 2 of epoch 2
                current = _checkpoint_path(backups)
                if current and current not in seen:
                    seen.append(current)
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.kill()
    finally:
        proc.wait()
        proc.stderr.close()


@pytest.mark.timeout(400)
def test_a_phase_killed_and_resumed_stops_early_at_the_same_epoch_with_the_same_weights(tiny_dataset, tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert _run_cli(_settings(tiny_dataset, str(reference), *EARLY_STOPPING)).returncode == ExitCode.OK

    _kill_in_the_second_fine_tuning_epoch(_settings(tiny_dataset, str(resumed), *EARLY_STOPPING), resumed)
    assert len(_fine_tuning_rows(resumed)) == 1  # killed inside epoch 2
    result = _run_cli(_settings(tiny_dataset, str(resumed), *EARLY_STOPPING))

    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    expected = json.loads((reference / "summary.json").read_text())
    got = json.loads((resumed / "summary.json").read_text())
    for summary in (expected, got):
        phase = summary["phases"]["fine_tuning"]
        assert (phase["epochs_run"], phase["best_epoch"]) == (2, None)  # 2 epochs of patience, none better
    assert got["weights_fingerprint"] == expected["weights_fingerprint"]
    assert got["evaluation"] == expected["evaluation"]


# --------------------------------------------------------------------------- a stopped local launch


def test_a_launch_stopped_between_slow_steps_backs_up_and_exits_preempted(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    # A stop check by steps only every 1000 steps (the epoch has 400): the seconds bound must bring it.
    settings = [
        "train.steps_per_epoch=400",
        "runtime.stop_check_every_steps=1000",
        "runtime.stop_check_seconds=2",
        "phases.fine_tuning.epochs=0",
    ]
    launch = ["launch", "--workers", "2", *_settings(tiny_dataset, str(output), *settings)[1:]]
    log = tmp_path / "launch.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen([sys.executable, "-m", "trainer", *launch], stdout=sink, stderr=subprocess.STDOUT)
    backups = output / "backup" / "feature_extraction"
    while launcher.poll() is None and _checkpoint_path(backups) is None:  # training has begun: a first backup
        time.sleep(0.1)
    first = _checkpoint_path(backups)

    stopped = time.monotonic()
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=120)

    print(f"SIGTERM to exit: {time.monotonic() - stopped:.1f} s")
    assert launcher.returncode == ExitCode.PREEMPTED, log.read_text()[-4000:]
    assert _checkpoint_path(backups) != first  # the stop wrote a backup of its own
    assert not (output / "metrics.jsonl").exists()  # ... mid-epoch: the epoch's end (step 400) never came


# --------------------------------------------------------------------------- one run per output


def test_a_second_run_on_the_same_output_fails_at_once_and_the_first_is_untouched(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    first_args = _settings(tiny_dataset, str(output), "runtime.seed=1", "train.steps_per_epoch=40")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer", *first_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        while first.poll() is None and not (output / LEASE_FILE).exists():
            time.sleep(0.05)

        started = time.monotonic()
        second = _run_cli(_settings(tiny_dataset, str(output), "runtime.seed=2"))
        refused_after = time.monotonic() - started

        assert second.returncode == ExitCode.TRANSIENT, second.stderr[-3000:]
        line = _error_line(second)
        assert f"trainer train pid {first.pid} on " in line and "in use by another run" in line
        print(f"second run refused after {refused_after:.1f} s")
        assert first.wait(timeout=300) == ExitCode.OK, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        first.stderr.close()
    summary = json.loads((output / "summary.json").read_text())
    assert summary["config"]["runtime"]["seed"] == 1
    assert [summary["phases"][p]["epochs_run"] for p in ("feature_extraction", "fine_tuning")] == [1, 2]
    assert not (output / LEASE_FILE).exists()  # released at the end


# --------------------------------------------------------------------------- shards that changed after prepare


def test_a_training_shard_cut_at_a_record_boundary_is_refused_before_training(tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    shard = sorted(dataset.glob("train-*.tfrecord"))[0]
    cut_after_records(shard, 2)  # a valid TFRecord file of 2 records; the manifest says more

    result = _run_cli(_settings(str(dataset), str(tmp_path / "run")))

    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert str(shard) in line and f"but the manifest says {_manifest_bytes(dataset, shard)}" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def _manifest_bytes(dataset, shard) -> int:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return next(s["bytes"] for s in manifest["shards"]["train"] if s["path"] == shard.name)


def test_a_training_shard_with_fewer_records_of_the_same_size_is_caught_as_it_is_read(tiny_dataset, tmp_path):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_dataset, dataset)
    shard = sorted(dataset.glob("train-*.tfrecord"))[0]
    merge_last_two_records(shard)  # the manifest's bytes still match; its records do not

    # The frozen phase's feature cache reads every training record once: it counts them.
    result = _run_cli(_settings(str(dataset), str(tmp_path / "run"), "train.cache_frozen_features=true"))

    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert "training shards gave" in line and str(shard) in line  # counted by the frozen phase's feature cache


# --------------------------------------------------------------------------- resuming with other settings


@pytest.fixture(scope="module")
def interrupted_run(tiny_dataset, tmp_path_factory):
    """A run killed in its first phase, after its first backup: (output dir, its files and their bytes)."""
    output = tmp_path_factory.mktemp("interrupted") / "run"
    args = _settings(tiny_dataset, str(output), "train.steps_per_epoch=200")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and _checkpoint_path(output / "backup" / "feature_extraction") is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return output, _files(output)


def _files(root, leaving_out: tuple[str, ...] = ()) -> dict[str, bytes]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in leaving_out)
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.mark.parametrize(
    ("setting", "started_with"),
    [
        ("data.image_size=48", "data.image_size=32"),
        ("model.head.dense_units=[32]", 'model.head={"pooling":"avg","dense_units":[16]'),
        ("model.weights=imagenet", "model.weights=none"),
    ],
)
def test_a_resume_with_a_setting_the_backup_cannot_survive_is_refused(
    interrupted_run, tiny_dataset, setting, started_with
):
    output, before = interrupted_run

    result = _run_cli(_settings(tiny_dataset, str(output), "train.steps_per_epoch=200", setting))

    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert f"was started with {started_with}" in line and "new output.dir" in line
    lease = (LEASE_FILE, f"{LEASE_FILE}.lock")  # the killed run's stale lease, taken over and released
    assert _files(output, lease) == {k: v for k, v in before.items() if k not in lease}  # nothing lost or changed


def test_a_resume_with_safe_changes_logs_them_and_completes(interrupted_run, tiny_dataset, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(interrupted_run[0], output)
    changed = [
        "train.steps_per_epoch=6",
        "phases.fine_tuning.epochs=1",
        "phases.fine_tuning.optimizer.learning_rate=0.002",
    ]

    result = _run_cli(_settings(tiny_dataset, str(output), *changed))

    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    assert "train.steps_per_epoch: 200 -> 6" in result.stderr
    assert "phases.fine_tuning.optimizer.learning_rate: 0.0001 -> 0.002" in result.stderr
    state = json.loads((output / "state.json").read_text())
    assert state["settings"]["train"]["steps_per_epoch"] == 200  # the start's settings stay the reference
    summary = json.loads((output / "summary.json").read_text())
    assert summary["config"]["phases"]["fine_tuning"]["epochs"] == 1


# --------------------------------------------------------------------------- damaged shards, unusable outputs


def _damaged_copy(dataset: str, tmp_path, shard: str, damage) -> str:
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    path = copy / shard
    path.write_bytes(damage(path.read_bytes()))
    return str(copy)


def _overwrite_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\xff" * 16 + data[middle + 16 :]


@pytest.mark.parametrize(
    ("shard", "damage"),
    [
        # Same size, bytes changed inside a record: TF says only "corrupted record at <offset>".
        pytest.param("train-00001-of-00004.tfrecord", _overwrite_middle, id="overwritten"),
        # Cut off mid-record (TF: "truncated record at <offset>"); read by the validation after epoch 1.
        pytest.param("validation-00000-of-00004.tfrecord", lambda data: data[: len(data) // 2], id="truncated"),
    ],
)
def test_a_damaged_shard_is_a_data_error_naming_it(tiny_dataset, tmp_path, shard, damage):
    dataset = _damaged_copy(tiny_dataset, tmp_path, shard, damage)

    result = _run_cli(_settings(dataset, str(tmp_path / "run")))

    assert result.returncode == ExitCode.DATA_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: shard {dataset}/{shard} ") and line.endswith("; re-run `trainer prepare`")


def test_an_output_dir_that_is_a_file_is_a_config_error(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    output.write_text("not a directory")

    result = _run_cli(_settings(tiny_dataset, str(output)))

    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: output.dir: cannot write {output}/.probe-worker-0-")
    assert line.endswith(f": {output} is a file, not a directory; choose another path")


def _in_a_mount_namespace(mounts: str, args: list[str]) -> subprocess.CompletedProcess:
    """`trainer ARGS` after the shell commands ``mounts``, in a private mount namespace (root only)."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "--fork", "true"]).returncode != 0:
        pytest.skip("needs root and `unshare --mount` to mount a read-only or a small file system")
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    trainer = shlex.join([sys.executable, "-m", "trainer", *args])
    return subprocess.run(
        ["unshare", "--mount", "--fork", "sh", "-c", f"set -e; {mounts}; exec {trainer}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_a_read_only_output_dir_is_a_config_error_naming_it(tiny_dataset, tmp_path):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount = f"mount --bind {read_only} {read_only}; mount -o remount,bind,ro {read_only}"

    result = _in_a_mount_namespace(mount, _settings(tiny_dataset, str(read_only / "run")))

    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: output.dir: cannot write {read_only}/run/.probe-worker-0-")
    assert line.endswith(": read-only file system; choose a writable location")


def test_a_full_disk_while_training_is_a_transient_error(tiny_dataset, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    # 2 MB: the probe and the first small files fit, the first backup (60 MB of VGG16 weights) does not.
    result = _in_a_mount_namespace(f"mount -t tmpfs -o size=2m tmpfs {small}", _settings(tiny_dataset, f"{small}/run"))

    assert result.returncode == ExitCode.TRANSIENT, result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: cannot write {small}/run/backup/")
    assert "no space left on the device; free space or enlarge the volume" in line


def test_what_a_run_writes_is_readable_by_other_users(tiny_dataset, tmp_path):
    output = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}

    result = subprocess.run(
        [sys.executable, "-m", "trainer", *_settings(tiny_dataset, str(output), "phases.fine_tuning.epochs=1")],
        capture_output=True, text=True, env=env, timeout=180, preexec_fn=lambda: os.umask(0o022),
    )  # fmt: skip

    assert result.returncode == ExitCode.OK, result.stderr[-3000:]
    modes = {str(p.relative_to(output)): stat.S_IMODE(p.stat().st_mode) for p in output.rglob("*") if p.is_file()}
    for name in ("summary.json", "state.json", "export/labels.txt", "phases/fine_tuning.weights.h5", "metrics.jsonl"):
        assert name in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
