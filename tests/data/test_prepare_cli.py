"""`trainer prepare` as a process, against inputs that go wrong.

Each test runs the real CLI (``python -m trainer prepare``) and checks its exit code and what
it leaves in the dataset directory: oversized files are skipped with bounded memory; a
read-only or misnamed output ends with one line and exit 64. Read-only disks are real: a
read-only bind mount in a private mount namespace (needs root).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.data.test_prepare import write_classes
from tests.support import processes
from trainer.contract import PREPARE_REPORT_FILE, ExitCode

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
    out, err = cli.communicate(timeout=60)

    assert cli.returncode == 0, err[-3000:]
    report = json.loads((dataset / PREPARE_REPORT_FILE).read_text())
    skipped = {s["path"]: s for s in report["skipped"]}
    assert {path: s["reason"] for path, s in skipped.items()} == {
        "a/huge.jpg": "too large",
        "b/huge.png": "too many pixels",
    }
    assert skipped["a/huge.jpg"]["detail"].startswith(f"{1536 * 2**20} bytes > 64000000")
    assert skipped["b/huge.png"]["detail"].startswith("12000x12000 = 144000000 pixels > 90000000")
    assert f"too large: a/huge.jpg ({1536 * 2**20} bytes > 64000000" in out
    assert "too many pixels: b/huge.png (12000x12000 = 144000000 pixels > 90000000" in out
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
