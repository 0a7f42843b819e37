"""trainer.bench.rounds and the busy gate: rounds, medians, spreads and busy marks from injected timings."""

from __future__ import annotations

import pytest

from trainer.bench import report, rounds, suite


def snap(wall: float, own: float, machine_busy: float, cpus: int = 2) -> dict:
    """A CPU snapshot as cpu_snapshot returns it (seconds of CPU time since some origin)."""
    return {"wall": wall, "own_cpu": own, "cpus": cpus, "machine_busy_cpu": machine_busy, "machine_total_cpu": 0.0}


def sample(rate: float, busy: bool = False) -> dict:
    return {"images_per_second": rate, "load": {"busy": busy}}


def test_other_processes_load_is_the_machines_busy_time_less_our_own():
    # 2 s of wall; we used 3.6 CPU-seconds (1.8 cores), the machine's CPUs 4.0: others used 0.2 cores.
    load = rounds.load_between(snap(10, 1, 100), snap(12, 4.6, 104))

    assert (load["own_cores"], load["other_cores"], load["busy"]) == (1.8, 0.2, False)


def test_a_measurement_is_busy_above_a_quarter_core_of_others():
    assert rounds.load_between(snap(0, 0, 0), snap(1, 0.5, 0.76))["busy"]  # others: 0.26 cores
    assert not rounds.load_between(snap(0, 0, 0), snap(1, 0.5, 0.75))["busy"]


def test_clock_tick_rounding_never_makes_others_negative():
    load = rounds.load_between(snap(0, 0, 0), snap(1, 1.0, 0.99))

    assert (load["other_cores"], load["busy"]) == (0.0, False)


def test_a_process_given_fewer_cores_than_it_asked_for_is_busy_even_on_a_quiet_machine():
    assert rounds.load_between(snap(0, 0, 0, cpus=1), snap(1, 1, 1, cpus=1), cores_wanted=2)["busy"]
    assert not rounds.load_between(snap(0, 0, 0, cpus=2), snap(1, 1, 1, cpus=2), cores_wanted=2)["busy"]


def test_a_serial_stage_using_one_of_two_cores_is_not_busy():
    # ImageDataGenerator: one Python thread on a 2-core pin, nothing else running.
    assert not rounds.load_between(snap(0, 0, 0), snap(1, 1, 1), cores_wanted=2)["busy"]


def test_measured_wraps_a_run_with_the_load_between_two_snapshots():
    snapshots = iter([snap(0, 0, 0), snap(2, 2, 3)])

    result = rounds.measured(lambda: {"images_per_second": 5.0}, snapshot=lambda: next(snapshots))

    assert result["images_per_second"] == 5.0
    assert (result["load"]["other_cores"], result["load"]["busy"]) == (0.5, True)


def test_cpu_snapshot_reads_this_machines_accounting():
    first = rounds.cpu_snapshot()
    second = rounds.cpu_snapshot()

    assert first["cpus"] >= 1 and 0 <= first["machine_busy_cpu"] <= first["machine_total_cpu"]
    assert second["machine_total_cpu"] >= first["machine_total_cpu"]


def rounds_from(busy_per_round: list[bool], sides=("a", "b"), min_clean=2, max_rounds=6):
    """Run rounds whose every measurement is busy or not as scripted, recording the order of measurements."""
    order, flags = [], iter(busy_per_round)
    current = {}

    def measure(side: str) -> dict:
        if not order or len(order) % len(sides) == 0:
            current["busy"] = next(flags)
        order.append(side)
        return sample(1.0, current["busy"])

    return rounds.run_rounds(measure, sides, min_clean, max_rounds), order


def test_rounds_alternate_and_stop_after_enough_unmarked_rounds():
    samples, order = rounds_from([False, False, False])

    assert order == ["a", "b", "b", "a"]  # rotated order: each side goes first in turn
    assert len(samples["a"]) == len(samples["b"]) == 2


def test_busy_rounds_are_replaced_by_more_rounds_up_to_the_maximum():
    samples, _ = rounds_from([True, False, True, False, False, False])
    assert len(samples["a"]) == 4  # two busy rounds cost two extra rounds

    samples, _ = rounds_from([True] * 6)
    assert len(samples["a"]) == 6  # never enough: stops at max_rounds


def test_ratio_is_the_median_of_unmarked_per_round_ratios_with_their_min_max():
    product = [sample(90), sample(100), sample(50, busy=True), sample(96), sample(99), sample(91)]
    limit = [sample(100), sample(100), sample(100), sample(100, busy=True), sample(100), sample(100)]

    figure = rounds.ratio(product, limit, "images_per_second", min_rounds=3)

    # Rounds 3 and 4 are out (one side busy each): 0.90, 1.00, 0.99, 0.91.
    assert (figure["median"], figure["min"], figure["max"]) == (0.95, 0.9, 1.0)
    assert (figure["rounds"], figure["rounds_busy"], figure["kind"]) == (6, 2, "rounds")
    assert [r["busy"] for r in figure["per_round"]] == [False, False, True, True, False, False]


def test_too_few_unmarked_rounds_give_no_median_but_keep_the_spread():
    figure = rounds.ratio([sample(1), sample(2, True)], [sample(1), sample(1)], "images_per_second", min_rounds=5)

    assert figure["median"] is None and (figure["min"], figure["max"]) == (1.0, 1.0)


def test_a_one_run_figure_counts_only_when_its_run_was_quiet():
    assert rounds.single(14.0, {"busy": False})["median"] == 14.0
    assert rounds.single(14.0, {"busy": True}) == {
        "median": None, "min": None, "max": None, "kind": "one run", "rounds": 1, "rounds_busy": 1,
    }  # fmt: skip


def test_median_of_and_busy_share_skip_and_count_marked_measurements():
    measurements = [sample(1), sample(3), sample(100, busy=True)]

    assert rounds.median_of(measurements, "images_per_second") == 2
    assert rounds.median_of([sample(1, busy=True)], "images_per_second") is None
    assert rounds.busy_share({"a": measurements, "b": [sample(1, busy=True)]}) == (2, 4)


def test_full_mode_takes_at_least_five_unmarked_rounds():
    assert suite.FULL.min_rounds >= rounds.MIN_ROUNDS == 5
    assert suite.FULL.max_rounds > suite.FULL.min_rounds  # room to replace busy rounds


# --------------------------------------------------------------------------- goals and the write gate


def figure(median: float | None, rounds_busy: int = 0) -> dict:
    return {"median": median, "min": median, "max": median, "kind": "rounds", "rounds": 5, "rounds_busy": rounds_busy}


def bench_result(pipeline_vs_limit: dict, quiet: bool = True) -> dict:
    inputs = {
        "product_vs_limit": pipeline_vs_limit,
        "product_vs_image_dataset": figure(1.3),
        "product_vs_generator": figure(3.5),
    }
    load = {"busy": not quiet, "other_cores": 0.0 if quiet else 1.5}
    return {
        "input_pipeline": {"1": inputs, "2": inputs},
        "training_step": {"pipeline_vs_synthetic": figure(0.97)},
        "feature_cache": {"speedup_after_first_epoch": 25.0},
        "finetune_cache": {"speedup_after_first_epoch": figure(3.5)},
        "plan_check": {"workers": {n: {"figure": rounds.single(1.1, load)} for n in ("1", "2")}},
        "time_to_accuracy": {"time_ratio": 12.0, "accuracy_difference": 0.1},
        "stage_load": {"trainer_runs": load, "time_to_accuracy": load},
        "machine": {"start_probe": load},
        "measurements_busy": [0, 40],
    }


def verdicts(result: dict) -> dict[str, dict]:
    return {g["goal"]: g for g in report.evaluate_goals(result)}


def test_goals_are_met_missed_or_not_measured_because_busy():
    result = bench_result(figure(None, rounds_busy=6), quiet=False)
    result["input_pipeline"]["1"] = {**result["input_pipeline"]["1"], "product_vs_limit": figure(0.9)}

    found = verdicts(result)

    assert found["input pipeline (c) / the limit (d), 1 core"]["status"] == "missed"
    assert found["input pipeline (c) / the limit (d), 1 core"]["short_by"] == 0.05
    assert found["input pipeline (c) / the limit (d), 2 cores"]["status"] == report.NOT_MEASURED_BUSY
    assert found["input pipeline (c) / Keras ImageDataGenerator (a), 2 cores"]["status"] == "met"
    one_run = [g for g in found.values() if g["kind"] == "one run"]
    assert len(one_run) == 4 and all(g["status"] == report.NOT_MEASURED_BUSY for g in one_run)
    assert not any(g["met"] for g in found.values() if g["status"] != "met")


def test_a_goal_without_its_measurement_is_not_measured_not_busy():
    result = bench_result(figure(0.97))
    del result["input_pipeline"]["2"]  # a one-core machine

    found = verdicts(result)

    missing = found["input pipeline (c) / the limit (d), 2 cores"]
    assert (missing["status"], missing["met"], missing["measured"]) == (report.NOT_MEASURED, False, None)
    assert found["input pipeline (c) / the limit (d), 1 core"]["met"]


def test_a_quiet_run_has_no_busy_reasons_and_a_busy_one_lists_them():
    quiet = bench_result(figure(0.97))
    quiet["goals"] = report.evaluate_goals(quiet)
    assert report.busy_reasons(quiet) == []

    busy = bench_result(figure(None, rounds_busy=6), quiet=False)
    busy["measurements_busy"] = [20, 40]
    busy["goals"] = report.evaluate_goals(busy)
    reasons = report.busy_reasons(busy)
    assert len(reasons) == 3  # busy at start; 50% of measurements marked; goals not measured
    assert "1.500 cores" in reasons[0] and "20 of 40" in reasons[1]
    assert "6 of 10 goals" in reasons[2]  # the limit at 1 and 2 cores, and the four one-run goals


def test_a_busy_run_writes_beside_existing_figures_unless_allowed(tmp_path):
    committed = [str(tmp_path / "benchmarks.json"), str(tmp_path / "benchmarks.md")]
    fresh = [str(tmp_path / "new.json"), str(tmp_path / "new.md")]
    for path in committed:
        open(path, "w").close()

    assert suite.output_paths(committed, busy=True, allow_busy=False) == (
        [str(tmp_path / "benchmarks.busy.json"), str(tmp_path / "benchmarks.busy.md")],
        True,
    )
    assert suite.output_paths(committed, busy=True, allow_busy=True) == (committed, False)
    assert suite.output_paths(committed, busy=False, allow_busy=False) == (committed, False)
    assert suite.output_paths(fresh, busy=True, allow_busy=False) == (fresh, False)


def test_a_busy_machine_at_start_refuses_before_measuring_when_figures_exist(tmp_path):
    table = tmp_path / "benchmarks.md"
    table.write_text("committed figures")
    said = []

    def busy():
        return {"busy": True, "other_cores": 1.2}

    with pytest.raises(suite.BenchBusy, match="will not overwrite"):
        suite._check_quiet_at_start(str(tmp_path / "b.json"), str(table), False, said.append, probe=busy)
    assert "WARNING" in said[0] and "1.200 cores" in said[0]
    assert suite._check_quiet_at_start(str(tmp_path / "b.json"), str(table), True, said.append, probe=busy)["busy"]
    assert table.read_text() == "committed figures"


def test_time_to_accuracy_counts_only_when_the_product_is_at_least_as_accurate():
    result = bench_result(figure(0.97))
    result["time_to_accuracy"] = {"time_ratio": 30.0, "accuracy_difference": -0.01}

    (goal,) = [g for name, g in verdicts(result).items() if name.startswith("time to the notebook's test accuracy")]

    assert (goal["measured"], goal["met"]) == (0.0, False)


def test_cores_per_gpu_is_the_gpus_rate_times_cpu_time_per_image():
    result = {"input_pipeline": {"1": {"methods": {"tfrecord_pipeline": {"cpu_ms_per_image": 2.0}}}}}

    (row,) = report.cores_per_gpu(result)

    assert row["cores_per_a100"] == pytest.approx(1190 * 2.0 / 1000, abs=0.05)
    assert row["cores_per_h100_estimate"] == pytest.approx(1190 * 989 / 312 * 2.0 / 1000, abs=0.05)
