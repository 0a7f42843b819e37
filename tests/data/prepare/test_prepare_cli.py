"""`trainer prepare` as a process, against inputs and disks that go wrong.

Each test runs the real CLI (``python -m trainer prepare``) and checks its exit code, its one
``error:`` line and what it leaves in the dataset directory: oversized files are skipped
with bounded memory; a read-only, full or misnamed output and SIGTERM end with one line and
a documented code; a re-run resumes from the complete shards. Read-only and full disks are
real: a read-only bind mount and a 2 MB tmpfs in a private mount namespace (needs root).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.data.prepare.test_prepare import write_classes
from tests.support import processes
from trainer.contract import MANIFEST_FILE, PREPARE_PROGRESS_FILE, PREPARE_REPORT_FILE, ExitCode
from trainer.data import records

pytestmark = pytest.mark.timeout(180)

SHARDS = 16  # prepare.min_shards of these tests: many small shards, so an interruption lands between them


# --------------------------------------------------------------------------- helpers


def prepare_command(source: Path, dataset: Path, *settings: str) -> list[str]:
    sets = [
        arg
        for setting in ("prepare.processes=1", f"prepare.min_shards={SHARDS}", *settings)
        for arg in ("--set", setting)
    ]
    return [sys.executable, "-m", "trainer", "prepare", str(source), str(dataset), *sets]


def quiet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def run(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=quiet_env(), timeout=timeout)


def error_line(stderr: str) -> str:
    """The one ``error:`` line a failed command prints (and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def shard_files(dataset: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted(dataset.glob("*.tfrecord"))}


def partial_files(dataset: Path) -> list[str]:
    return sorted(p.name for p in dataset.glob("*.partial"))


def progress_record(dataset: Path) -> dict:
    return json.loads((dataset / PREPARE_PROGRESS_FILE).read_text())["shards"]


def assert_complete(dataset: Path, images: int) -> dict:
    """The dataset is whole: its manifest lists every image once, each shard holds what it says."""
    manifest = json.loads((dataset / MANIFEST_FILE).read_text())
    listed = {s["path"]: s for split in manifest["shards"].values() for s in split}
    assert sorted(shard_files(dataset)) == sorted(listed)
    assert sum(s["records"] for s in listed.values()) == images
    for name, shard in listed.items():
        assert sum(1 for _ in tf.data.TFRecordDataset(str(dataset / name))) == shard["records"], name
        assert (dataset / name).stat().st_size == shard["bytes"], name
    assert partial_files(dataset) == [] and not (dataset / PREPARE_PROGRESS_FILE).exists()
    return json.loads((dataset / PREPARE_REPORT_FILE).read_text())


def write_noise_images(root: Path, per_class: int, side: int, suffix: str = ".png", seed: int = 0) -> int:
    """Two classes of noise images (PNG: re-encoded by prepare, a few milliseconds each; JPEG stored as is)."""
    rng = np.random.default_rng(seed)
    options = {"compress_level": 1} if suffix == ".png" else {"quality": 90}
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"img{i:03d}{suffix}", **options)
    return 2 * per_class


def write_flat_png(path: Path, width: int, height: int) -> None:
    """A one-colour RGB PNG, made row by row: a 12000x12000 image is a ~400 KB file, never in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\x00" + b"\x80" * (3 * width)  # filter byte 0, then grey pixels
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def peak_rss_mb(pid: int) -> int | None:
    """VmHWM: the most memory the process has held resident so far."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) // 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None  # gone, or a zombie


class MountNamespace:
    """A private mount namespace, held by a sleeping process: commands enter it with nsenter, and the
    test reads its files through /proc/<holder>/root. Mounts made in it vanish with the holder."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline and self.holder.poll() is None, "unshare did not start"
            time.sleep(0.01)

    def command(self, *args: str) -> list[str]:
        # --wd: entering a mount namespace moves to its "/"; stay where the test runs (`python -m trainer`
        # imports the trainer of the working directory, as every other subprocess of the tests does).
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--wd={os.getcwd()}", "--", *args]

    def mount(self, *args: str) -> None:
        subprocess.run(self.command("mount", *args), check=True, capture_output=True, timeout=30)

    def view(self, path: Path) -> Path:
        """``path`` as processes inside the namespace see it."""
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def mount_namespace():
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"needs mount namespaces (root): unshare --mount fails: {probe.stderr.decode().strip()}")
    namespace = MountNamespace()
    yield namespace
    namespace.close()


# --------------------------------------------------------------------------- bounded resources


def test_oversized_files_are_skipped_from_size_and_header_with_little_memory(tmp_path):
    source, dataset = tmp_path / "photos", tmp_path / "prepared"
    write_classes(source, {"a": 3, "b": 3})
    huge = source / "a" / "huge.jpg"  # 1.5 GB of zeros named .jpg; sparse, so it takes no disk
    with open(huge, "wb") as fh:
        fh.truncate(1536 * 2**20)
    write_flat_png(source / "b" / "huge.png", 12000, 12000)  # 144 MP; 432 MB once decoded to RGB

    # Two worker processes: the files are checked there. Their peak memory is read while they live.
    cli = subprocess.Popen(
        prepare_command(source, dataset, "prepare.processes=2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=quiet_env(),
    )
    peaks: dict[int, int] = {}
    while cli.poll() is None:
        for pid in processes.descendants(cli.pid) | {cli.pid}:
            peaks[pid] = max(peaks.get(pid, 0), peak_rss_mb(pid) or 0)
        time.sleep(0.02)
    _, err = cli.communicate(timeout=60)

    assert cli.returncode == 0, err[-3000:]
    report = json.loads((dataset / PREPARE_REPORT_FILE).read_text())
    skipped = {s["path"]: s for s in report["skipped"]}
    assert {path: s["reason"] for path, s in skipped.items()} == {
        "a/huge.jpg": "too large",
        "b/huge.png": "too many pixels",
    }
    assert skipped["a/huge.jpg"]["detail"].startswith(f"{1536 * 2**20} bytes > 64000000")
    assert skipped["b/huge.png"]["detail"].startswith("12000x12000 = 144000000 pixels > 90000000")
    assert sum(report["images"].values()) == 6
    workers = [peak for pid, peak in peaks.items() if pid != cli.pid]
    print(f"peak RSS: main process {peaks[cli.pid]} MB (TensorFlow), workers {sorted(workers)} MB")
    assert len(workers) >= 2
    # Reading the 1.5 GB file took 1.5 GB per worker, decoding the PNG 0.7 GB; headers take next to nothing.
    assert max(workers) < 200, peaks
    assert peaks[cli.pid] < 1024, peaks


# --------------------------------------------------------------------------- unusable output


@pytest.mark.parametrize("where", ["existing", "new"])
def test_a_read_only_dataset_directory_is_one_config_error(tmp_path, mount_namespace, where):
    source, mounted = tmp_path / "photos", tmp_path / "readonly"
    write_classes(source, {"a": 3, "b": 3})
    mounted.mkdir()
    mount_namespace.mount("--bind", str(mounted), str(mounted))
    mount_namespace.mount("-o", "remount,bind,ro", str(mounted))
    dataset = mounted if where == "existing" else mounted / "new" / "prepared"  # the mount itself, or below it

    result = run(mount_namespace.command(*prepare_command(source, dataset)))

    assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
    line = error_line(result.stderr)
    assert str(dataset) in line and "read-only" in line and "writable location" in line
    assert list(mount_namespace.view(mounted).iterdir()) == []


def test_a_dataset_path_through_an_existing_file_is_one_config_error(tmp_path):
    source, file = tmp_path / "photos", tmp_path / "notes.txt"
    write_classes(source, {"a": 3, "b": 3})
    file.write_text("keep me")

    for dataset in (file, file / "prepared"):
        result = run(prepare_command(source, dataset))

        assert result.returncode == ExitCode.CONFIG_ERROR, result.stderr[-3000:]
        line = error_line(result.stderr)
        assert str(dataset) in line and "not a directory" in line
    assert file.read_text() == "keep me"


def test_a_full_disk_keeps_the_complete_shards_and_a_rerun_resumes(tmp_path, mount_namespace):
    source, disk = tmp_path / "photos", tmp_path / "disk"
    images = write_noise_images(source, per_class=100, side=128, suffix=".jpg", seed=1)  # ~15 KB each: 3 MB of shards
    disk.mkdir()
    mount_namespace.mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    dataset = disk / "prepared"
    seen = mount_namespace.view(dataset)

    full = run(mount_namespace.command(*prepare_command(source, dataset)))

    assert full.returncode == ExitCode.TRANSIENT, full.stderr[-3000:]
    line = error_line(full.stderr)
    kept = shard_files(seen)
    assert 0 < len(kept) < 2 * SHARDS
    assert str(dataset) in line and "no space left" in line
    assert f"{len(kept)} of {2 * SHARDS} shard(s) complete and kept, the partial one removed" in line
    assert "re-run the same command to resume" in line
    assert partial_files(seen) == [] and not (seen / MANIFEST_FILE).exists()
    assert sorted(progress_record(seen)) == sorted(kept)

    # One image of the first kept shard changes before the re-run: that shard must not be kept.
    changed_shard = sorted(kept)[0]
    changed = sources_of(seen / changed_shard)[0]
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(source / changed, quality=90)

    mount_namespace.mount("-o", "remount,size=16m", str(disk))  # space freed
    again = run(mount_namespace.command(*prepare_command(source, dataset)))

    assert again.returncode == 0, again.stderr[-3000:]
    report = assert_complete(seen, images)
    assert report["shards_reused"] == len(kept) - 1
    after = shard_files(seen)
    for name, before in kept.items():  # kept as they were, not written again; the changed one rewritten
        same = (after[name].st_ino, after[name].st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert same == (name != changed_shard), name
    assert stored_bytes(seen / changed_shard, changed) == (source / changed).read_bytes()


def _records(shard: Path) -> list[dict]:
    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in (records.SOURCE, records.ENCODED)}
    parsed = tf.data.TFRecordDataset(str(shard)).map(lambda raw: tf.io.parse_single_example(raw, spec))
    return [{key: value.numpy() for key, value in example.items()} for example in parsed]


def sources_of(shard: Path) -> list[str]:
    return [r[records.SOURCE].decode() for r in _records(shard)]


def stored_bytes(shard: Path, source: str) -> bytes:
    return next(r[records.ENCODED] for r in _records(shard) if r[records.SOURCE].decode() == source)


# --------------------------------------------------------------------------- SIGTERM


SLOW_IMAGES = 300  # PNGs of 200x200 noise: a prepare of several seconds on these 2 cores


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slow") / "photos"
    write_noise_images(root, per_class=SLOW_IMAGES // 2, side=200)
    return root


def _wait_for(condition, cli: subprocess.Popen, stderr: Path, what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert cli.poll() is None, f"prepare ended (exit {cli.returncode}) before {what}: {stderr.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_while_writing_exits_preempted_and_a_rerun_resumes(tmp_path, slow_source, processes):
    dataset, log = tmp_path / "prepared", tmp_path / "stderr.txt"
    command = prepare_command(slow_source, dataset, f"prepare.processes={processes}")
    with open(log, "w") as sink:
        cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=quiet_env())
        # Two shards under their final names: at least one is complete, the next one is on its way.
        _wait_for(lambda: len(shard_files(dataset)) >= 2, cli, log, "shards")
        cli.send_signal(signal.SIGTERM)
        code = cli.wait(timeout=60)

    assert code == ExitCode.PREEMPTED, log.read_text()[-3000:]
    line = error_line(log.read_text())
    kept = shard_files(dataset)
    assert "SIGTERM" in line and str(dataset) in line and f"{len(kept)} of {2 * SHARDS} shard(s) complete" in line
    assert partial_files(dataset) == [] and not (dataset / MANIFEST_FILE).exists()
    assert sorted(progress_record(dataset)) == sorted(kept)

    again = run(command)  # no --overwrite needed: an unfinished dataset is resumed

    assert again.returncode == 0, again.stderr[-3000:]
    report = assert_complete(dataset, SLOW_IMAGES)
    assert report["skipped_count"] == 0
    assert report["shards_reused"] == len(kept) >= 1
    after = shard_files(dataset)
    for name, before in kept.items():
        assert (after[name].st_ino, after[name].st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name


def test_sigterm_while_checking_exits_preempted_without_blaming_an_image(tmp_path, slow_source):
    dataset, log = tmp_path / "prepared", tmp_path / "stderr.txt"
    command = prepare_command(slow_source, dataset)
    with open(log, "w") as sink:
        cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=quiet_env())
        _wait_for(lambda: "found " in log.read_text(), cli, log, "start of the checks")
        time.sleep(0.5)  # into the checks (several seconds), in this process (prepare.processes=1)
        cli.send_signal(signal.SIGTERM)
        code = cli.wait(timeout=60)

    assert code == ExitCode.PREEMPTED, log.read_text()[-3000:]
    line = error_line(log.read_text())
    # It names the dataset (what to re-run), not an image: before, a SIGTERM inside PIL's decode was
    # taken for a corrupt image and the run went on; elsewhere it said "resumes from its last backup".
    assert "SIGTERM" in line and str(dataset) in line and ".png" not in line
    assert shard_files(dataset) == {} and not (dataset / MANIFEST_FILE).exists()

    again = run(command)

    assert again.returncode == 0, again.stderr[-3000:]
    assert assert_complete(dataset, SLOW_IMAGES)["skipped_count"] == 0


def test_a_disk_turned_read_only_after_the_start_is_one_config_error(tmp_path, slow_source, mount_namespace):
    mounted = tmp_path / "disk"
    mounted.mkdir()
    mount_namespace.mount("--bind", str(mounted), str(mounted))
    dataset, log = mounted / "prepared", tmp_path / "stderr.txt"
    command = mount_namespace.command(*prepare_command(slow_source, dataset))
    with open(log, "w") as sink:
        cli = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink, env=quiet_env())
        _wait_for(lambda: "found " in log.read_text(), cli, log, "start of the checks")
        # Writable when prepare looked at it; read-only by the time the checks are done.
        mount_namespace.mount("-o", "remount,bind,ro", str(mounted))
        code = cli.wait(timeout=60)

    assert code == ExitCode.CONFIG_ERROR, log.read_text()[-3000:]
    line = error_line(log.read_text())
    assert str(dataset) in line and "writable location" in line and "no shard was written yet" in line

    mount_namespace.mount("-o", "remount,bind,rw", str(mounted))
    again = run(command)

    assert again.returncode == 0, again.stderr[-3000:]
    assert_complete(mount_namespace.view(dataset), SLOW_IMAGES)
