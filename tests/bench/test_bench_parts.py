"""trainer.bench: the scaling model's arithmetic, the first-step marker, band goals, and the fine-tuning cache's
and `trainer plan` check's figures from synthetic runs (other goal verdicts: test_rounds.py)."""

from __future__ import annotations

import pytest

from trainer.bench import comms, finetune, plan_check, report, rounds, runs
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


# --------------------------------------------------------------------------- band goals


@pytest.mark.parametrize(
    ("measured", "verdict"),
    [(0.74, ("missed", 0.01, None)), (0.75, ("met", None, None)), (1.0, ("met", None, None)),
     (1.25, ("met", None, None)), (1.3, ("missed", None, 0.05))],
)  # fmt: skip
def test_a_band_goal_is_met_inside_its_band_and_missed_either_side(measured, verdict):
    goal = report.Goal("plan / run", 0.75, lambda r: r, "why", upper=1.25)

    assert goal.describe() == "0.75-1.25"
    assert goal.judge(measured) == verdict
    assert report.Goal("ratio", 3.0, lambda r: r, "why").judge(9.0) == ("met", None, None)  # ">=": no upper bound


def test_the_plan_goals_are_bands_and_a_busy_run_never_counts():
    quiet = {"busy": False, "other_cores": 0.0}
    busy = {"busy": True, "other_cores": 1.2}
    result = {"plan_check": {"workers": {"1": {"figure": rounds.single(1.4, quiet)},
                                         "2": {"figure": rounds.single(1.0, busy)}}}}  # fmt: skip

    found = {g["goal"]: g for g in report.evaluate_goals(result) if "trainer plan" in g["goal"]}

    one, two = (next(g for name, g in found.items() if f"{n} " in name) for n in (1, 2))
    assert one["target"] == "0.75-1.25" and (one["status"], one["over_by"], one["short_by"]) == ("missed", 0.15, None)
    assert (two["status"], two["measured"], two["met"]) == (report.NOT_MEASURED_BUSY, None, False)  # inside, but busy


# --------------------------------------------------------------------------- the fine-tuning cache section


def finetune_run(mean: float, accuracy: float, busy: bool = False, cached: bool = False) -> dict:
    return {
        "seed": 1, "epoch_seconds_after_first": [mean, mean], "epoch_mean_seconds": mean,
        "cache_build_seconds": 2.0 if cached else None, "accuracy": accuracy, "accuracy_split": "test",
        "wall_seconds": 30.0, "load": {"busy": busy, "other_cores": 0.5 if busy else 0.0},
    }  # fmt: skip


def finetune_samples(busy_pair: int | None = None) -> dict:
    plain = [(4.0, 0.90), (3.0, 0.94), (4.5, 0.92)]
    cached = [(1.0, 0.93), (1.5, 0.95), (1.5, 0.91)]
    return {
        "uncached": [finetune_run(m, a, busy=i == busy_pair) for i, (m, a) in enumerate(plain)],
        "cached": [finetune_run(m, a, cached=True) for m, a in cached],
    }


def test_the_fine_tuning_speed_up_is_the_median_of_pairs_and_accuracy_lies_in_the_band():
    section = finetune.summarize(finetune_samples(), 3, 6, {"train": 1, "validation": 1, "test": 1}, {})

    speedup = section["speedup_after_first_epoch"]
    assert [r["ratio"] for r in speedup["per_round"]] == [4.0, 2.0, 3.0]
    assert (speedup["median"], speedup["min"], speedup["max"], speedup["rounds_busy"]) == (3.0, 2.0, 4.0, 0)
    band = section["accuracy"]
    assert band["uncached_min_max"] == [0.90, 0.94] and band["cached"] == [0.93, 0.95, 0.91]
    assert band["within_band"]  # 0.95 <= 0.94 + 0.02
    assert section["cache_build_seconds"] == [2.0, 2.0, 2.0]
    goal = next(g for g in report.evaluate_goals({"finetune_cache": section}) if "fine-tuning" in g["goal"])
    assert (goal["target"], goal["status"], goal["spread_min_max"]) == (">= 3.0x", "met", [2.0, 4.0])


def test_a_busy_run_keeps_the_fine_tuning_speed_up_from_its_goal_and_a_far_accuracy_leaves_the_band():
    samples = finetune_samples(busy_pair=1)
    samples["cached"][2]["accuracy"] = 0.87  # below 0.90 - 0.02
    section = finetune.summarize(samples, 3, 6, {"train": 1, "validation": 1, "test": 1}, {})

    assert section["speedup_after_first_epoch"]["median"] is None and section["runs_busy"] == 1
    assert not section["accuracy"]["within_band"]
    goal = next(g for g in report.evaluate_goals({"finetune_cache": section}) if "fine-tuning" in g["goal"])
    assert goal["status"] == report.NOT_MEASURED_BUSY and not goal["met"]


def test_the_expected_gpu_gain_comes_from_the_blocks_flops():
    gain = finetune.expected_gain(BLOCK_GMAC, ["block5"])

    forward = sum(BLOCK_GMAC.values())
    assert gain["uncached_step_gmac"] == pytest.approx(forward + 2 * 1.39)  # every forward + block5's backward
    assert gain["cached_step_gmac"] == pytest.approx(3 * 1.39)  # block5's forward and backward only
    assert gain["speedup"] == pytest.approx((forward + 2 * 1.39) / (3 * 1.39), abs=0.01)
    assert gain["frozen_forward_share"] == pytest.approx(0.909, abs=0.001)  # the "about 91%"


def test_plan_check_compares_the_mean_of_two_probes_with_the_measured_epochs():
    checked = plan_check.compare([3.0, 1.0, 1.0], [5.0, 1.4, 1.2], [3.5, 1.0, 1.5])

    assert checked["predicted_epoch_seconds"] == [4.0, 1.2, 1.1]
    assert (checked["predicted_seconds"], checked["measured_seconds"], checked["ratio"]) == (6.3, 6.0, 1.05)
    with pytest.raises(ValueError, match="the run had 2"):
        plan_check.compare([1.0], [1.0], [1.0, 1.0])


def test_predicted_epochs_put_each_phases_tracing_on_its_first_epoch():
    phases = [
        {"epochs": 1, "first_epoch_train_seconds": 5.0, "train_seconds_per_epoch": 1.0},
        {"epochs": 2, "first_epoch_train_seconds": 6.0, "train_seconds_per_epoch": 2.0},
    ]
    plan = {"rows": [{"workers": 2, "phases": phases}]}

    assert plan_check.predicted_epochs(plan, 2) == [5.0, 6.0, 2.0]
