"""trainer.bench: the scaling model's arithmetic and the first-step marker (goal verdicts: test_rounds.py)."""

from __future__ import annotations

import pytest

from trainer.bench import comms, runs
from trainer.config import VGG16_BLOCKS

BLOCK_GMAC = {"block1": 1.94, "block2": 2.77, "block3": 4.62, "block4": 4.62, "block5": 1.39}


def test_ring_all_reduce_sends_twice_the_data_less_one_share():
    gigabyte = 10**9
    # 8 Gb/s moves 1 GB/s: two workers exchange 2 * 1/2 of the bytes, eight workers 2 * 7/8.
    assert comms.ring_seconds(gigabyte, 2, link_gbps=8) == pytest.approx(1.0)
    assert comms.ring_seconds(gigabyte, 8, link_gbps=8) == pytest.approx(1.75)


def test_phase_cost_is_forward_plus_twice_the_trainable_blocks():
    assert comms.phase_compute_fraction(list(VGG16_BLOCKS), BLOCK_GMAC) == pytest.approx(1.0)
    assert comms.phase_compute_fraction([], BLOCK_GMAC) == pytest.approx(1 / 3)
    forward = sum(BLOCK_GMAC.values())
    assert comms.phase_compute_fraction(["block5"], BLOCK_GMAC) == pytest.approx((forward + 2 * 1.39) / (3 * forward))


def test_efficiency_bounds():
    assert comms.efficiency(1.0, 1.0) == {"efficiency_no_overlap": 0.5, "efficiency_full_overlap": 1.0}
    assert comms.efficiency(1.0, 4.0) == {"efficiency_no_overlap": 0.2, "efficiency_full_overlap": 0.25}


@pytest.mark.parametrize(
    ("output", "found"),
    [
        (b"Epoch 1/4\n\r1/8 [==>...........................] - ETA: 12s - loss: 2.3", True),
        (b"\x08\x08\x08\r 1/16 [>....]", True),
        (b"Epoch 1/4\n", False),  # the epoch counter is not a step
        (b"\r11/16 [=====>....]", False),
    ],
)
def test_first_step_marker_is_the_first_progress_bar_update(output, found):
    assert bool(runs.FIRST_STEP.search(output)) is found


@pytest.mark.parametrize(
    "line",
    [
        "feature cache: 256 training records (centre crops) and 64 validation images through the frozen base in 3.6 s "
        "(features 1x1x512, 0.6 MB in /x); the head trains on them",
        "feature cache: 256 training records (2 augmented views per image) and 64 validation images through the "
        "frozen blocks up to block4 in 3.6 s (features 2x2x512, 2.6 MB in /x); the blocks above and the head train",
    ],
)
def test_extraction_seconds_are_read_from_the_feature_cache_log_line(tmp_path, line):
    log = tmp_path / "run.log"
    log.write_text(f"12:00:00 INFO trainer: {line}\n")

    assert runs.extraction_seconds(str(log)) == 3.6
