"""scripts/gpu-check.sh: a clean no-op without GPUs, and its code paths run for real on CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from trainer.bench import comms, gpu_check
from trainer.config import VGG16_BLOCKS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"
#: NOTES.md section 2: VGG16's conv blocks at 224x224, forward GMAC per image.
BLOCK_GMAC = {"block1": 1.94, "block2": 2.77, "block3": 4.62, "block4": 4.62, "block5": 1.39}

needs_no_gpu = pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA GPU")


def _check(tmp_path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@needs_no_gpu
def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    started = time.monotonic()
    result = _check(tmp_path, "--json", str(tmp_path / "results.json"), timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu-check: no NVIDIA GPU here") and result.stdout.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # not even the --json file
    assert time.monotonic() - started < 20  # decided before TensorFlow is imported


def test_training_flops_are_three_forwards_when_everything_trains():
    forward = sum(BLOCK_GMAC.values())  # 15.34 GMAC ~ 31 GFLOP

    assert gpu_check.train_gflop_per_image(BLOCK_GMAC, 0.0, list(VGG16_BLOCKS)) == pytest.approx(6 * forward)
    assert gpu_check.train_gflop_per_image(BLOCK_GMAC, 0.0, []) == pytest.approx(2 * forward)  # head-only: forward
    block5 = gpu_check.train_gflop_per_image(BLOCK_GMAC, 0.0, ["block5"])
    assert block5 == pytest.approx(2 * (forward + 2 * BLOCK_GMAC["block5"]))
    assert block5 == pytest.approx(6 * forward * comms.phase_compute_fraction(["block5"], BLOCK_GMAC))


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("Tesla T4", 65.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", 125.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_of_the_gpu_nvidia_smi_names(name, peak):
    assert gpu_check.peak_tflops(name) == peak


def test_utilisation_is_per_gpu_work_over_the_peak():
    result = {"run": "mirrored", "replicas": 4, "global_batch": 256, "images_per_second": 4000.0}
    row = gpu_check.with_utilisation({**result, "train_gflop_per_image": 93.0}, "NVIDIA A100-SXM4-80GB", 312.0)

    assert row["images_per_second_per_device"] == 1000.0
    assert row["achieved_tflops_per_device"] == pytest.approx(93.0)
    assert row["mfu"] == pytest.approx(93.0 / 312.0)
    assert "29.8%" in gpu_check.table([row])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_run_completes_on_cpu_with_the_products_model(tmp_path):
    out = tmp_path / "results.json"
    # The frozen-base phase: ~17 s for the 4 processes here, where fine_tuning's backward through
    # all of VGG16 (and its XLA compile) takes ~2.5 min on 2 shared cores; the code paths are the same.
    small = ["--steps", "2", "--warmup", "1", "--image-size", "32", "--batch", "2", "--phase", "feature_extraction"]

    result = _check(tmp_path, "--allow-cpu", *small, "--json", str(out), timeout=540)

    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    runs = {r["run"]: r for r in json.loads(out.read_text())["results"]}
    assert sorted(runs) == sorted(gpu_check.RUNS)
    assert {name: (r["replicas"], r["global_batch"]) for name, r in runs.items()} == {
        "mirrored": (2, 4),  # 2 logical CPU devices
        "multi_worker_nccl": (2, 4),  # 2 processes, one replica each
        "xla": (1, 2),
    }
    assert all(r["images_per_second"] > 0 and r["mfu"] is None for r in runs.values())  # no peak for a CPU
    # Only the head trains: the step costs one forward of VGG16 at 32x32 (~15.35 GMAC x (32/224)^2, 2 FLOPs each).
    assert all(r["trainable_blocks"] == [] for r in runs.values())
    assert runs["xla"]["train_gflop_per_image"] == pytest.approx(2 * 15.35 * (32 / 224) ** 2, rel=0.02)
    assert [line.split()[0] for line in result.stdout.splitlines()[2:]] == list(gpu_check.RUNS)  # the table's rows


@pytest.mark.slow
def test_a_run_that_fails_is_a_row_with_its_error_and_exit_1(tmp_path):
    # VGG16 needs inputs of at least 32x32: the worker stops at the configuration check.
    result = _check(tmp_path, "--allow-cpu", "--runs", "xla", "--image-size", "16", "--steps", "1", timeout=240)

    assert result.returncode == 1
    (row,) = result.stdout.splitlines()[2:]
    assert row.split()[:3] == ["xla", "failed:", "exit"] and "32" in row, result.stdout
