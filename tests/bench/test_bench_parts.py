"""trainer.bench: the scaling model's arithmetic, goal verdicts and the first-step marker."""

from __future__ import annotations

import pytest

from trainer.bench import comms, report, runs
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


def _result(product_vs_baseline: float) -> dict:
    inputs = {"product_vs_baseline": product_vs_baseline, "product_vs_limit": 0.95}
    return {
        "input_pipeline": {"1": inputs, "2": inputs},
        "training_step": {"pipeline_vs_synthetic": 0.99},
        "feature_cache": {"speedup_after_first_epoch": 25.0},
        "time_to_accuracy": {"time_ratio": 12.0, "accuracy_difference": 0.1},
    }


def test_goals_say_what_is_met_and_by_how_much_one_is_missed():
    verdicts = {g["goal"]: g for g in report.evaluate_goals(_result(product_vs_baseline=1.5))}

    baseline = verdicts["input pipeline (c) vs the baseline (a), 2 cores"]
    assert (baseline["met"], baseline["short_by"], baseline["target"]) == (False, 0.5, ">= 2.0x")
    assert sum(not g["met"] for g in verdicts.values()) == 1
    assert all(g["why_they_differ"] for g in verdicts.values())


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


def test_a_goal_without_its_measurement_is_not_met_and_says_so():
    result = _result(product_vs_baseline=3.0)
    del result["input_pipeline"]["2"]  # a one-core machine

    verdicts = {g["goal"]: g for g in report.evaluate_goals(result)}

    missing = verdicts["input pipeline (c) vs the baseline (a), 2 cores"]
    assert (missing["measured"], missing["met"], missing["short_by"]) == (None, False, None)
    assert verdicts["input pipeline (c) vs the limit (d), 1 core"]["met"]


def test_time_to_accuracy_counts_only_when_the_product_is_at_least_as_accurate():
    result = _result(product_vs_baseline=2.5)
    result["time_to_accuracy"] = {"time_ratio": 30.0, "accuracy_difference": -0.01}

    verdicts = {g["goal"]: g for g in report.evaluate_goals(result)}

    (goal,) = [g for name, g in verdicts.items() if name.startswith("time to the notebook's test accuracy")]
    assert (goal["measured"], goal["met"]) == (0.0, False)
