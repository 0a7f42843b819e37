"""The benchmark suite: one run, one machine, one generated image set; JSON + markdown out.

Order: generate the JPEG set and prepare it with the product's `prepare`, then
1. input pipelines at 1 and 2 cores (worker processes, methods interleaved per round);
2. training steps fed by the pipeline vs by in-memory tensors (one worker process);
3. communication volume counted from the real models, and the scaling model;
4. real `trainer train` runs: feature extraction without and with the feature cache
   (epoch times, start-up, peak memory), then two workers (start-up, memory per worker);
5. time to accuracy on real images (scanned digits): the product's default run, then the
   notebook recipe it replaces (trainer.bench.accuracy);
6. the fine-tuning cache on the digits, alternating pairs of runs (trainer.bench.finetune);
7. `trainer plan --probe` against a 1- and a 2-worker run (trainer.bench.plan_check).
Quick mode (for the tests) runs the same code on tiny sizes, all processes at once, and
skips the two-worker run: its figures mean nothing, only its shape does.

Figures that reproduce (trainer.bench.rounds): the machine is probed before anything starts;
every measurement carries the load it ran under, ratios are medians of unmarked alternating
rounds with their spread, and a busy run never overwrites existing result files unless
``allow_busy`` (it writes ``*.busy.*`` beside them and exits with ExitCode.TRANSIENT).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from trainer.bench import finetune, inputs, plan_check, rounds, runs
from trainer.bench.accuracy import time_to_accuracy
from trainer.bench.images import make_image_set
from trainer.contract import ExitCode
from trainer.errors import ConfigError, TrainerError
from trainer.supervisor import Child

SCHEMA_VERSION = 2  # 2: samples carry their load; ratios are figures with spread and busy counts


@dataclass(frozen=True)
class Settings:
    classes: int
    per_class: int
    input_image_size: int
    min_rounds: int  # unmarked rounds a ratio needs to count toward a goal (rounds.MIN_ROUNDS in full mode)
    max_rounds: int  # rounds stop here even when too many were busy
    input_batches: int
    input_warmup: int
    model_image_size: int
    train_batch: int
    train_steps: int
    train_warmup: int
    run_epochs: int
    run_batch: int
    two_worker_run: bool
    concurrent_runs: bool
    timeout_seconds: float
    accuracy_timeout_seconds: float  # each command of the time-to-accuracy figure


FULL = Settings(
    classes=4, per_class=80, input_image_size=224, min_rounds=rounds.MIN_ROUNDS, max_rounds=10, input_batches=12,
    input_warmup=3, model_image_size=32, train_batch=32, train_steps=4, train_warmup=1,
    run_epochs=4, run_batch=32, two_worker_run=True, concurrent_runs=False, timeout_seconds=600,
    accuracy_timeout_seconds=5400,
)  # fmt: skip
QUICK = Settings(
    classes=2, per_class=8, input_image_size=224, min_rounds=1, max_rounds=1, input_batches=1, input_warmup=1,
    model_image_size=32, train_batch=4, train_steps=1, train_warmup=1,
    run_epochs=2, run_batch=4, two_worker_run=False, concurrent_runs=True, timeout_seconds=300,
    accuracy_timeout_seconds=300,
)  # fmt: skip
CORE_COUNTS = (1, 2)


class BenchError(TrainerError):
    """A benchmark step failed (its log is named in the message)."""


def step_failed(name: str, outcome: str, log_path: str) -> BenchError:
    """The error for a failed benchmark step: what ended it, its log, and the log's last lines."""
    with open(log_path, errors="replace") as fh:
        tail = fh.read()[-1500:]
    return BenchError(f"benchmark step {name!r} failed ({outcome}); see {log_path}:\n{tail}")


class BenchBusy(BenchError):
    """The machine was busy: figures were not written over the existing ones. Worth retrying later."""

    exit_code = ExitCode.TRANSIENT


def run_bench(
    out_json: str,
    out_table: str,
    quick: bool,
    workdir: str | None,
    say: Callable[[str], None],
    allow_busy: bool = False,
) -> dict:
    if importlib.util.find_spec("scipy") is None:
        raise ConfigError(
            "trainer bench needs SciPy for its baseline (Keras' ImageDataGenerator imports it); "
            "install it with: pip install 'vgg-trainer[bench]'"
        )
    start_probe = _check_quiet_at_start(out_json, out_table, allow_busy, say)
    settings = QUICK if quick else FULL
    started = time.time()
    root = workdir or tempfile.mkdtemp(prefix="trainer-bench-")
    os.makedirs(root, exist_ok=True)
    try:
        result = _run_all(settings, root, quick, say)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    result["seconds"] = round(time.time() - started, 1)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    result["machine"]["start_probe"] = start_probe
    _conclude(result)
    _write_results(result, out_json, out_table, allow_busy, say)
    return result


def _check_quiet_at_start(
    out_json: str, out_table: str, allow_busy: bool, say: Callable[[str], None], probe=rounds.probe_machine
) -> dict:
    """Watch the machine before measuring; a busy machine may not overwrite existing figures."""
    load = probe()
    if not load["busy"]:
        return load
    say(
        f"bench: WARNING: the machine is busy (other processes use {load['other_cores']:.3f} cores, threshold "
        f"{rounds.BUSY_OTHER_CORES}); its figures will be marked and will not reproduce"
    )
    existing = [path for path in (out_json, out_table) if os.path.exists(path)]
    if existing and not allow_busy:
        raise BenchBusy(
            f"the machine is busy, so trainer bench will not overwrite {' and '.join(existing)}: run it on a quiet "
            "machine, write elsewhere (--out/--table), or pass --allow-busy (the files then say so at the top)"
        )
    return load


def _conclude(result: dict) -> None:
    from trainer.bench.report import busy_reasons, cores_per_gpu, evaluate_goals

    result["measurements_busy"] = _measurements_busy(result)
    result["goals"] = evaluate_goals(result)
    result["cores_per_gpu"] = cores_per_gpu(result) if "1" in result["input_pipeline"] else []
    result["busy_reasons"] = busy_reasons(result)


def _measurements_busy(result: dict) -> list[int]:
    parts = [*(p["samples"] for p in result["input_pipeline"].values()), result["training_step"]["samples"]]
    counts = [rounds.busy_share(samples) for samples in parts]
    return [sum(marked for marked, _ in counts), sum(total for _, total in counts)]


def _write_results(result: dict, out_json: str, out_table: str, allow_busy: bool, say: Callable[[str], None]) -> None:
    """Write the figures; a busy run writes beside existing files, not over them, unless allowed."""
    from trainer.bench.report import markdown

    busy = bool(result["busy_reasons"])
    result["forced"] = busy and allow_busy
    targets, refused = output_paths([out_json, out_table], busy, allow_busy)
    _write(targets[0], json.dumps(result, indent=2) + "\n")
    _write(targets[1], markdown(result))
    say(f"bench: done in {result['seconds']:.0f} s; wrote {targets[0]} and {targets[1]}")
    if busy:
        say("bench: WARNING: busy machine: " + "; ".join(result["busy_reasons"]))
    if refused:
        raise BenchBusy(
            f"the machine was busy, so trainer bench did not overwrite {out_json} or {out_table}; the figures are in "
            f"{targets[0]} and {targets[1]} (--allow-busy writes over them anyway, saying so at the top)"
        )


def output_paths(paths: list[str], busy: bool, allow_busy: bool) -> tuple[list[str], bool]:
    """Where a run's figures go, and whether it refused the paths asked for: a busy run never
    replaces existing files (the committed figures) unless allowed; it writes beside them."""
    refused = busy and not allow_busy and any(os.path.exists(path) for path in paths)
    return ([_beside(path) for path in paths] if refused else list(paths)), refused


def _beside(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.busy{ext}"


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def _run_all(settings: Settings, root: str, quick: bool, say: Callable[[str], None]) -> dict:
    result = {
        "schema_version": SCHEMA_VERSION,
        "mode": "quick" if quick else "full",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "versions": _versions(),
        "settings": asdict(settings),
    }
    say(f"bench: generating {settings.classes * settings.per_class} JPEGs and preparing them in {root}")
    image_dir, dataset_dir = _prepare_images(settings, root, "dataset", settings.input_image_size)
    # The runs at the small model input read a dataset prepared for it, as `trainer prepare` is meant to be used.
    _, model_dataset_dir = _prepare_images(settings, root, "dataset-model", settings.model_image_size)
    result["image_set"] = _describe_images(image_dir)
    cores = [c for c in CORE_COUNTS if c <= len(os.sched_getaffinity(0))]
    jobs = _worker_jobs(settings, image_dir, dataset_dir, model_dataset_dir, cores)
    trainer_runs = _trainer_run_starters(settings, model_dataset_dir, root)
    accuracy = functools.partial(time_to_accuracy, root, quick, settings.accuracy_timeout_seconds, say)
    goal_runs = _goal_runs(settings, root, model_dataset_dir, quick, say)
    if settings.concurrent_runs:  # quick mode: everything at once, only the shape of the result matters
        say("bench: all measurements at once (quick mode)")
        before = rounds.cpu_snapshot_with_children()
        with ThreadPoolExecutor(max_workers=1 + len(goal_runs)) as background:
            real_data = background.submit(accuracy)
            more = {name: background.submit(run) for name, run in goal_runs.items()}
            started_runs = {name: start() for name, start in trainer_runs.items()}
            started_jobs = {name: _start_worker(name, *job, root) for name, job in jobs.items()}
            results = {name: _finish_worker(h, settings.timeout_seconds) for name, h in started_jobs.items()}
            outcomes = {name: _finish_run(name, workers, settings) for name, workers in started_runs.items()}
            result["time_to_accuracy"] = real_data.result()
            result.update({name: future.result() for name, future in more.items()})
        load = rounds.load_between(before, rounds.cpu_snapshot_with_children())
        result["stage_load"] = {"trainer_runs": load, "time_to_accuracy": load}
    else:  # one measurement at a time, each with the machine to itself
        results, outcomes = {}, {}
        for name, job in jobs.items():
            say(f"bench: {name} ({', '.join(task for task, _ in job[1])})")
            results[name] = _finish_worker(_start_worker(name, *job, root), settings.timeout_seconds)
        before = rounds.cpu_snapshot_with_children()
        for name, start in trainer_runs.items():
            say(f"bench: trainer {name}")
            outcomes[name] = _finish_run(name, start(), settings)
        result["stage_load"] = {"trainer_runs": rounds.load_between(before, rounds.cpu_snapshot_with_children())}
        say("bench: time to accuracy on real images")
        before = rounds.cpu_snapshot_with_children()
        result["time_to_accuracy"] = accuracy()
        result["stage_load"]["time_to_accuracy"] = rounds.load_between(before, rounds.cpu_snapshot_with_children())
        result.update({name: run() for name, run in goal_runs.items()})  # each run carries its own load
    last = f"cores-{cores[-1]}"
    result["input_pipeline"] = {str(c): _summarize_inputs(results[f"cores-{c}"][0], settings.min_rounds) for c in cores}
    result["training_step"] = _summarize_training(results[last][1], settings.min_rounds)
    result["communication"] = results[last][2]
    result.update(_summarize_runs(outcomes, settings, root))
    return result


def _goal_runs(
    settings: Settings, root: str, dataset_dir: str, quick: bool, say: Callable[[str], None]
) -> dict[str, Callable[[], dict]]:
    """result key -> the measurement of a goal that runs its own `trainer` processes (trainer.bench.finetune:
    the fine-tuning cache on real digits; trainer.bench.plan_check: `trainer plan` against real runs)."""
    workers = [1, 2] if settings.two_worker_run else [1]
    return {
        "finetune_cache": functools.partial(
            finetune.measure_finetune_cache, root, quick, settings.timeout_seconds, say
        ),
        "plan_check": functools.partial(
            plan_check.measure_plan, root, dataset_dir, workers, quick, settings.timeout_seconds, say
        ),
    }


def _worker_jobs(
    settings: Settings, image_dir: str, dataset_dir: str, model_dataset_dir: str, cores: list[int]
) -> dict:
    """name -> (cores to pin, tasks): one process per core count; the training step and the model
    counts run in the last one (all cores), after its input measurements."""
    jobs = {
        f"cores-{count}": (count, [("inputs", _input_args(settings, image_dir, dataset_dir, count))]) for count in cores
    }
    jobs[f"cores-{cores[-1]}"][1].extend([("training", _training_args(settings, model_dataset_dir)), ("comms", {})])
    return jobs


# --------------------------------------------------------------------------- data


def _prepare_images(settings: Settings, root: str, name: str, image_size: int) -> tuple[str, str]:
    """The generated JPEG set (made once) and a dataset `trainer prepare` wrote from it for ``image_size``."""
    from trainer.config import PrepareConfig
    from trainer.data.prepare import prepare_dataset

    image_dir, dataset_dir = os.path.join(root, "images"), os.path.join(root, name)
    if not os.path.isdir(image_dir):
        make_image_set(image_dir, settings.classes, settings.per_class, seed=0)
    cfg = PrepareConfig(validation_fraction=0.2, min_shards=8, processes=0, image_size=image_size)
    prepare_dataset(image_dir, dataset_dir, cfg, progress=lambda _: None, overwrite=True)
    return image_dir, dataset_dir


def _describe_images(image_dir: str) -> dict:
    from PIL import Image

    sizes_kb, widths, heights = [], [], []
    for folder, _, names in os.walk(image_dir):
        for name in names:
            path = os.path.join(folder, name)
            sizes_kb.append(os.path.getsize(path) / 1000)
            with Image.open(path) as image:
                widths.append(image.size[0])
                heights.append(image.size[1])
    return {
        "images": len(sizes_kb),
        "kb": {key: round(fn(sizes_kb), 1) for key, fn in (("min", min), ("mean", statistics.mean), ("max", max))},
        "mean_size": [round(statistics.mean(widths)), round(statistics.mean(heights))],
    }


# --------------------------------------------------------------------------- worker processes


@dataclass
class _WorkerHandle:
    name: str
    child: Child
    result_path: str
    log_path: str


def _start_worker(name: str, cores: int | None, tasks: list, root: str) -> _WorkerHandle:
    """Run ``tasks`` in a fresh process (trainer.bench.worker), pinned to ``cores`` if given."""
    job_path = os.path.join(root, f"{name}.job.json")
    result_path, log_path = os.path.join(root, f"{name}.result.json"), os.path.join(root, f"{name}.log")
    with open(job_path, "w") as fh:
        json.dump({"cores": cores, "tasks": tasks}, fh)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    child = Child([sys.executable, "-m", "trainer.bench.worker", job_path, result_path], env=env, log_path=log_path)
    return _WorkerHandle(name, child, result_path, log_path)


def _finish_worker(handle: _WorkerHandle, timeout: float) -> list[dict]:
    code = handle.child.wait(timeout)  # killed past the timeout
    handle.child.join_output()
    if code != 0:
        raise step_failed(handle.name, f"exit {code}", handle.log_path)
    with open(handle.result_path) as fh:
        return json.load(fh)


def _input_args(settings: Settings, image_dir: str, dataset_dir: str, cores: int) -> dict:
    return {
        "cores": cores,
        "image_dir": image_dir,
        "dataset_dir": dataset_dir,
        "image_size": settings.input_image_size,
        "min_rounds": settings.min_rounds,
        "max_rounds": settings.max_rounds,
        "batches": settings.input_batches,
        "warmup": settings.input_warmup,
    }


def _training_args(settings: Settings, dataset_dir: str) -> dict:
    return {
        "dataset_dir": dataset_dir,
        "image_size": settings.model_image_size,
        "batch": settings.train_batch,
        "min_rounds": settings.min_rounds,
        "max_rounds": settings.max_rounds,
        "steps": settings.train_steps,
        "warmup": settings.train_warmup,
    }


def _summarize_inputs(raw: dict, min_rounds: int) -> dict:
    samples = raw["samples"]
    methods = {name: _method_figures(runs_) for name, runs_ in samples.items()}
    # The limit is the fastest candidate by its median over unmarked rounds (all rounds when none is
    # unmarked: the ratios then say "machine busy" anyway). Choosing by median, not by the best of each
    # round, keeps one lucky measurement from raising the limit.
    limit = max(inputs.LIMIT_CANDIDATES, key=lambda name: methods[name]["images_per_second"])
    product = samples["tfrecord_pipeline"]

    def vs(other: str) -> dict:
        return rounds.ratio(product, samples[other], "images_per_second", min_rounds)

    return {
        **{k: v for k, v in raw.items() if k != "samples"},
        "methods": methods,
        "limit_method": limit,
        "product_vs_limit": vs(limit),
        "product_vs_image_dataset": vs("image_dataset_from_directory"),
        "product_vs_generator": vs("flow_from_directory"),
        "rounds_busy": rounds.busy_share(samples)[0],
        "samples": samples,
    }


def _method_figures(samples: list[dict]) -> dict:
    """Medians over unmarked measurements; over all of them, flagged, when every one was busy."""
    clean = [s for s in samples if not s["load"]["busy"]]
    chosen = clean or samples
    figures = {
        key: round(statistics.median(s[key] for s in chosen), digits)
        for key, digits in (("images_per_second", 1), ("cpu_ms_per_image", 3), ("cores_used", 2))
    }
    return {**figures, "measurements": len(samples), "busy": len(samples) - len(clean), "from_busy_only": not clean}


def _summarize_training(raw: dict, min_rounds: int) -> dict:
    samples = raw["samples"]
    return {
        **raw,
        "synthetic_images_per_second": rounds.median_of(samples["synthetic"], "images_per_second"),
        "pipeline_images_per_second": rounds.median_of(samples["pipeline"], "images_per_second"),
        "pipeline_vs_synthetic": rounds.ratio(
            samples["pipeline"], samples["synthetic"], "images_per_second", min_rounds
        ),
        "rounds_busy": rounds.busy_share(samples)[0],
    }


# --------------------------------------------------------------------------- trainer runs


def _run_settings(settings: Settings, dataset_dir: str, output_dir: str, *extra: str) -> list[str]:
    return [
        "model.weights=none",
        f"data.dataset={dataset_dir}",
        f"data.image_size={settings.model_image_size}",
        f"output.dir={output_dir}",
        f"train.batch_size_per_replica={settings.run_batch}",
        f"phases.feature_extraction.epochs={settings.run_epochs}",
        "phases.fine_tuning.epochs=0",
        "runtime.verbose=1",  # a progress line after every step: how start-up is timed
        *extra,
    ]


def _trainer_run_starters(settings: Settings, dataset_dir: str, root: str) -> dict[str, Callable[[], list]]:
    """name -> a function that starts that run's worker processes."""

    def run_settings(name: str, *extra: str) -> list[str]:
        return _run_settings(settings, dataset_dir, os.path.join(root, name), *extra)

    def log(name: str) -> str:
        return os.path.join(root, f"{name}.log")

    starters = {
        "run-uncached": lambda: [runs.single_worker(run_settings("run-uncached"), log("run-uncached"))],
        "run-cached": lambda: [
            runs.single_worker(run_settings("run-cached", "train.cache_frozen_features=true"), log("run-cached"))
        ],
    }
    if settings.two_worker_run:
        starters["run-2w"] = lambda: runs.multi_worker(
            run_settings("run-2w", "train.steps_per_epoch=2"), os.path.join(root, "run-2w"), 2
        )
    return starters


def _finish_run(name: str, workers: list, settings: Settings) -> list[dict]:
    outcomes = [runs.finish(worker, settings.timeout_seconds) for worker in workers]
    for index, outcome in enumerate(outcomes):
        _require(outcome, f"{name} worker {index}")
    return outcomes


def _summarize_runs(outcomes: dict[str, list[dict]], settings: Settings, root: str) -> dict:
    (plain,), (cached,) = outcomes["run-uncached"], outcomes["run-cached"]

    def path(name: str) -> str:
        return os.path.join(root, name)

    return {
        "feature_cache": _cache_summary(settings, path, cached),
        "startup": {
            "single_worker": _startup(plain),
            "two_workers": [_startup(r) for r in outcomes.get("run-2w", [])],
        },
    }


def _require(outcome: dict, what: str) -> None:
    try:
        runs.require_success(outcome, what)
    except RuntimeError as err:
        raise BenchError(str(err)) from None


def _cache_summary(settings: Settings, path, cached: dict) -> dict:
    phase = "feature_extraction"
    plain_epochs = runs.epoch_seconds(path("run-uncached"), phase)
    cached_epochs = runs.epoch_seconds(path("run-cached"), phase)
    plain_mean, cached_mean = statistics.mean(plain_epochs), statistics.mean(cached_epochs)
    return {
        "image_size": settings.model_image_size,
        "batch": settings.run_batch,
        "epochs": settings.run_epochs,
        "uncached_epoch_seconds_after_first": plain_epochs,
        "cached_epoch_seconds_after_first": cached_epochs,
        "cached_extraction_seconds": runs.extraction_seconds(cached["log"]),
        "speedup_after_first_epoch": round(plain_mean / cached_mean, 1),
        "uncached_phase_seconds": _phase_seconds(path("run-uncached"), phase),
        "cached_phase_seconds": _phase_seconds(path("run-cached"), phase),
    }


def _phase_seconds(output_dir: str, phase: str) -> float:
    with open(os.path.join(output_dir, "summary.json")) as fh:
        return json.load(fh)["phases"][phase]["seconds"]


def _startup(outcome: dict) -> dict:
    return {key: outcome[key] for key in ("seconds_to_first_step", "peak_rss_mb", "wall_seconds")}


# --------------------------------------------------------------------------- context


def _machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "platform": platform.platform(),
        "load_average_start": list(os.getloadavg()),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("vgg-trainer", "tensorflow", "tf-keras", "pillow", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found
