"""`trainer bench --quick`: the whole suite end to end on tiny sizes.

Quick-mode figures mean nothing (tiny sizes, everything at once); the test checks that
every part ran for real and wrote its figures, and the communication volumes, which are
exact counts from the real models.
"""

from __future__ import annotations

import json

import pytest

from trainer.bench import report
from trainer.bench.inputs import LIMIT_CANDIDATES, METHODS
from trainer.cli import main
from trainer.contract import ExitCode

pytestmark = pytest.mark.slow

#: Trainable parameters of VGG16's block5 (3 convs of 3x3x512x512 + bias) and of the default
#: head for 10 classes (dense 512->256, 256->10), and of Keras' VGG16 with its ImageNet top.
BLOCK5_PARAMS = 3 * (3 * 3 * 512 * 512 + 512)
HEAD_PARAMS = (512 * 256 + 256) + (256 * 10 + 10)
VGG16_WITH_TOP_PARAMS = 138_357_544


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, table = root / "bench.json", root / "bench.md"
    code = main(["bench", "--quick", "--out", str(out), "--table", str(table), "--workdir", str(root / "work")])
    assert code == ExitCode.OK
    return json.loads(out.read_text()), table.read_text()


def positive(value) -> bool:
    return isinstance(value, int | float) and value > 0


def test_input_pipelines_were_measured_at_one_and_two_cores(quick):
    result, _ = quick
    assert set(result["input_pipeline"]) == {"1", "2"}
    for cores, part in result["input_pipeline"].items():
        assert part["cpus"] is not None and len(part["cpus"]) == int(cores)  # pinned
        assert set(part["methods"]) == set(METHODS)
        for figures in part["methods"].values():
            assert all(positive(figures[key]) for key in ("images_per_second", "cpu_ms_per_image", "cores_used"))
        assert part["limit_method"] in LIMIT_CANDIDATES
        for name in ("product_vs_limit", "product_vs_image_dataset", "product_vs_generator"):
            ratio = part[name]
            assert ratio["rounds"] == 1 and len(ratio["per_round"]) == 1 and positive(ratio["per_round"][0]["ratio"])
        for samples in part["samples"].values():  # every measurement carries the load it ran under
            assert all(s["load"]["cpus"] == int(cores) and s["load"]["wall_seconds"] > 0 for s in samples)
    assert 60 <= result["image_set"]["kb"]["mean"] <= 110


def test_training_steps_cache_runs_and_start_up_were_measured(quick):
    result, _ = quick
    training = result["training_step"]
    assert training["pipeline_vs_synthetic"]["rounds"] == 1
    assert all(positive(s["images_per_second"]) for feed in training["samples"].values() for s in feed)
    cache = result["feature_cache"]
    assert cache["uncached_epoch_seconds_after_first"] and cache["cached_epoch_seconds_after_first"]
    assert all(map(positive, cache["uncached_epoch_seconds_after_first"] + cache["cached_epoch_seconds_after_first"]))
    assert positive(cache["cached_extraction_seconds"]) and positive(cache["speedup_after_first_epoch"])
    startup = result["startup"]
    assert startup["two_workers"] == []  # quick mode skips the two-worker run
    for run in [startup["single_worker"]]:
        assert positive(run["seconds_to_first_step"]) and run["seconds_to_first_step"] < run["wall_seconds"]
        assert run["peak_rss_mb"] > 200  # a TensorFlow process with VGG16 in memory


def test_the_product_and_the_notebook_ran_on_the_real_digits(quick):
    result, table = quick
    t = result["time_to_accuracy"]

    assert t["dataset"]["images"] == {"train": 56, "validation": 12, "test": 12}  # 8 per class, 70/15/15
    for side in ("product", "notebook"):
        assert 0.0 <= t[side]["test_accuracy"] <= 1.0 and positive(t[side]["seconds"])
    assert t["product"]["recipe"] == "scratch"  # model.weights=none and nothing else
    assert t["notebook"]["test_images"] == 12
    assert t["time_ratio"] == pytest.approx(t["notebook"]["seconds"] / t["product"]["seconds"], abs=0.006)  # 2 decimals
    assert "## 6. Time to accuracy on real images" in table


def test_the_fine_tuning_cache_ran_in_pairs_on_the_real_digits(quick):
    result, _ = quick
    f = result["finetune_cache"]
    assert f["dataset"]["images"] == {"train": 56, "validation": 12, "test": 12}
    assert (f["pairs"], f["epochs"], f["trained_blocks"]) == (1, 2, ["block5"])
    for side in ("uncached", "cached"):
        (run,) = f["samples"][side]
        assert run["seed"] == 1 and len(run["epoch_seconds_after_first"]) == 1  # 2 epochs: one after the first
        assert positive(run["epoch_mean_seconds"]) and 0.0 <= run["accuracy"] <= 1.0 and run["accuracy_split"] == "test"
        assert "busy" in run["load"] and run["load"]["wall_seconds"] > 0
    assert f["samples"]["uncached"][0]["cache_build_seconds"] is None
    assert positive(f["samples"]["cached"][0]["cache_build_seconds"])
    speedup = f["speedup_after_first_epoch"]
    assert speedup["rounds"] == 1 and positive(speedup["per_round"][0]["ratio"])
    if speedup["rounds_busy"]:  # a busy pair never makes a figure
        assert speedup["median"] is None
    else:
        assert speedup["median"] == pytest.approx(speedup["per_round"][0]["ratio"], abs=0.001)
    band = f["accuracy"]
    low, high = band["uncached_min_max"]
    assert band["within_band"] == (low - 0.02 <= band["cached"][0] <= high + 0.02)
    gpu = f["gpu_expectation"]  # from the model's layer shapes at 224x224
    assert gpu["image_size"] == 224 and gpu["block_forward_gmac"]["block1"] == pytest.approx(1.94, abs=0.01)
    assert gpu["speedup"] == pytest.approx(4.35, abs=0.05)
    assert gpu["frozen_forward_share"] == pytest.approx(0.91, abs=0.01)


def test_trainer_plan_was_checked_against_a_one_worker_run(quick):
    result, _ = quick
    p = result["plan_check"]
    assert list(p["workers"]) == ["1"] and p["band"] == [0.75, 1.25]  # quick mode skips the two-worker run
    checked = p["workers"]["1"]
    assert len(checked["predicted_epoch_seconds"]) == len(checked["measured_epoch_seconds"]) == 2  # 1 + 1 epochs
    assert checked["ratio"] == pytest.approx(checked["predicted_seconds"] / checked["measured_seconds"], abs=0.001)
    assert checked["figure"]["kind"] == "one run"
    assert checked["figure"]["median"] == (None if checked["load"]["busy"] else checked["ratio"])
    goals = {g["goal"]: g for g in result["goals"] if "trainer plan" in g["goal"]}
    assert [g["target"] for g in goals.values()] == ["0.75-1.25"] * 2
    assert next(g for name, g in goals.items() if "2 local workers" in name)["status"] == report.NOT_MEASURED


def test_communication_volumes_are_counted_from_the_real_models(quick):
    result, _ = quick
    comm = result["communication"]
    volumes = comm["product_model"]["bytes_per_step"]
    assert volumes["frozen base"] == 4 * HEAD_PARAMS
    assert volumes["block5"] == 4 * (BLOCK5_PARAMS + HEAD_PARAMS)
    assert volumes["frozen base"] < volumes["block5"] < volumes["blocks 4-5"] < volumes["whole network"]
    assert comm["vgg16_imagenet_top"]["bytes_per_step"] == 4 * VGG16_WITH_TOP_PARAMS
    assert comm["block_forward_gmac"]["block1"] == pytest.approx(1.94, abs=0.01)  # 224x224: published figure
    for row in comm["scaling"]:
        assert 0 < row["efficiency_no_overlap"] <= row["efficiency_full_overlap"] <= 1


def test_goals_and_markdown_table(quick):
    result, table = quick
    assert len(result["goals"]) == 10
    statuses = {"met", "missed", report.NOT_MEASURED_BUSY, report.NOT_MEASURED}  # quick mode: no 2-worker run
    # The time-to-accuracy goal counts 0 when the product is less accurate (likely after quick mode's 1 epoch).
    assert all(g["status"] in statuses and (g["measured"] is None or g["measured"] >= 0) for g in result["goals"])
    for heading in ("## Goals", "## 1. Input pipeline", "## 2. Training step", "## 3. Feature-extraction phase",
                    "## 4. Start-up and memory", "## 5. Communication volume", "## 7. Fine-tuning phase",
                    "## 8. `trainer plan` against measured runs"):  # fmt: skip
        assert heading in table
    assert "Quick mode" in table and "How figures are taken" in table and "cores per A100" in table
    assert [row["method"] for row in result["cores_per_gpu"]] == list(METHODS)


def test_a_busy_run_says_so_at_the_top(quick):
    result, table = quick
    marked, total = result["measurements_busy"]
    assert total == 2 * len(METHODS) + 2 and 0 <= marked <= total  # one round at 1 and 2 cores; 2 training feeds
    # Quick mode runs everything at once, so its rounds usually see each other as load.
    assert bool(result["busy_reasons"]) == table.split("\n")[2].startswith("**Taken on a busy machine")
