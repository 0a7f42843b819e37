"""Goals and the markdown table (docs/benchmarks.md) from a benchmark result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.bench import comms, finetune, gpu_check, plan_check, rounds

METHOD_LABELS = {
    "flow_from_directory": "(a) Keras `ImageDataGenerator.flow_from_directory` (baseline)",
    "image_dataset_from_directory": "(b) Keras `image_dataset_from_directory` over the source JPEGs (limit candidate)",
    "tfrecord_pipeline": "(c) this product: TFRecord shards, `training_dataset`",
    "decode_resize": "(d1) limit candidate: `decode_jpeg` + resize, the stored bytes in memory",
    "decode_fast_dct_resize": "(d2) limit candidate: `decode_jpeg(dct_method='INTEGER_FAST')` + resize",
    "decode_scaled_resize": "(d3) limit candidate: DCT-scaled `decode_jpeg` (ratio 1/2/4/8) + resize",
    "decode_crop_resize": "(d4) limit candidate: (c)'s crop-window `decode_and_crop_jpeg` + resize",
}

#: How the text refers to each method: "(c) `tfrecord_pipeline`".
METHOD_TAGS = {name: f"{label.split(' ', 1)[0]} `{name}`" for name, label in METHOD_LABELS.items()}

#: Published VGG16 training throughput of an A100 (fp16, tf_cnn_benchmarks as run by Lambda Labs).
A100_IMAGES_PER_SECOND = comms.GPU_IMAGES_PER_SECOND["A100 fp16"]
#: No published VGG16 training figure for the H100 was found: this is an ESTIMATE, the A100 figure
#: scaled by the ratio of the two GPUs' dense fp16 peaks (NVIDIA data sheets). CNN training gains
#: less than the peak ratio, so it overstates the H100's rate, and the cores it needs: an upper bound.
H100_IMAGES_PER_SECOND_ESTIMATE = round(
    A100_IMAGES_PER_SECOND * gpu_check.peak_tflops("H100 SXM") / gpu_check.peak_tflops("A100")
)


@dataclass(frozen=True)
class Goal:
    """Met when the figure's median is at least ``target`` and, for a band, at most ``upper``."""

    name: str
    target: float
    measured: Callable[[dict], dict]  # a figure: rounds.ratio / rounds.single shape
    why_they_differ: str
    upper: float | None = None  # None: ">= target"; else the band target..upper

    def describe(self) -> str:
        return f">= {self.target}x" if self.upper is None else f"{self.target}-{self.upper}"

    def judge(self, measured: float) -> tuple[str, float | None, float | None]:
        """(status, short by, over by) of a measured figure."""
        if measured < self.target:
            return "missed", round(self.target - measured, 3), None
        if self.upper is not None and measured > self.upper:
            return "missed", None, round(measured - self.upper, 3)
        return "met", None, None


def _inputs_ratio(cores: str, which: str) -> Callable[[dict], dict]:
    return lambda r: r["input_pipeline"][cores][which]


_LIMIT_GAP = (
    "(c) also reads, shuffles and parses TFRecords, flips, and carries labels; the limit only turns bytes "
    "into the training tensor, by the fastest path measured."
)

GOALS = [
    Goal("input pipeline (c) / the limit (d), 1 core", 0.95, _inputs_ratio("1", "product_vs_limit"), _LIMIT_GAP),
    Goal("input pipeline (c) / the limit (d), 2 cores", 0.95, _inputs_ratio("2", "product_vs_limit"), _LIMIT_GAP),
    Goal(
        "input pipeline (c) / Keras `image_dataset_from_directory` (b), 2 cores",
        1.2,
        _inputs_ratio("2", "product_vs_image_dataset"),
        "(b) decodes whole JPEGs from files and squash-resizes; (c) reads TFRecords and decodes a random crop.",
    ),
    Goal(
        "input pipeline (c) / Keras ImageDataGenerator (a), 2 cores",
        3.0,
        _inputs_ratio("2", "product_vs_generator"),
        "(a) decodes every full JPEG with PIL and preprocesses in numpy on one Python thread; (c) decodes "
        "only the crop window, on every core, with no Python per image.",
    ),
    Goal(
        "training step fed by the pipeline / by in-memory tensors, 32x32, 2 cores",
        0.95,
        lambda r: r["training_step"]["pipeline_vs_synthetic"],
        "the pipeline decodes on the same cores the step computes on.",
    ),
    Goal(
        "feature-extraction epoch time, cache off / cache on (epochs after the first; one run each)",
        10.0,
        lambda r: rounds.single(r["feature_cache"]["speedup_after_first_epoch"], r["stage_load"]["trainer_runs"]),
        "without the cache every epoch runs the frozen base on every training and validation image.",
    ),
]


def _time_to_notebook_accuracy(r: dict) -> dict:
    """The notebook's seconds over the product's, counted only when the product is at least as accurate."""
    t = r["time_to_accuracy"]
    return rounds.single(t["time_ratio"] if t["accuracy_difference"] >= 0 else 0.0, r["stage_load"]["time_to_accuracy"])


GOALS.append(
    Goal(
        "time to the notebook's test accuracy on real images: notebook seconds / product seconds (one run each)",
        10.0,
        _time_to_notebook_accuracy,
        "both train VGG16 from random weights at the same input on the same cores; the notebook trains block5 "
        "and a Flatten head (fewer FLOPs per step) with Python-thread ImageDataGenerator augmentation for up to "
        "20 epochs, the product every block with Adam for 10 epochs.",
    )
)

GOALS.append(
    Goal(
        "fine-tuning epoch time on real images (digits, 32x32), cache_frozen_blocks off / on (epochs after the "
        "first; median of alternating pairs)",
        3.0,
        finetune.speedup_figure,
        finetune.WHY_32PX,
    )
)
_PLAN_GAP = (
    "the probe times a few steps of each phase in one process with every core; the run adds backups and the "
    "pipeline's start per epoch, and local workers meet at every all-reduce, which on shared, oversubscribed "
    "cores waits for the scheduler (not in the model)."
)
GOALS += [
    Goal(
        f"`trainer plan --probe` predicted / measured training seconds, {n} (within 25%, one run)",
        plan_check.BAND[0],
        plan_check.figure(workers),
        _PLAN_GAP,
        upper=plan_check.BAND[1],
    )
    for workers, n in ((1, "1 worker (`trainer train`)"), (2, "2 local workers (`trainer launch --workers 2`)"))
]

NOT_MEASURED = "not measured"
NOT_MEASURED_BUSY = "not measured (machine busy)"


def evaluate_goals(result: dict) -> list[dict]:
    return [_verdict(goal, result) for goal in GOALS]


def _verdict(goal: Goal, result: dict) -> dict:
    try:
        figure = goal.measured(result)
    except KeyError:  # e.g. no second core to measure on
        figure = None
    measured = figure["median"] if figure else None
    short_by = over_by = None
    if measured is None:
        status = NOT_MEASURED_BUSY if figure and figure["rounds_busy"] else NOT_MEASURED
    else:
        status, short_by, over_by = goal.judge(measured)
    spread = None if figure is None or figure["min"] is None else [figure["min"], figure["max"]]
    kind = figure["kind"] if figure else None
    return {
        "goal": goal.name,
        "target": goal.describe(),
        "measured": measured,
        "kind": kind,
        "spread_min_max": spread,
        "rounds": figure["rounds"] if figure else 0,
        "rounds_busy": figure["rounds_busy"] if figure else 0,
        "status": status,
        "met": status == "met",
        "short_by": short_by,
        "over_by": over_by,
        "why_they_differ": goal.why_they_differ,
    }


def busy_reasons(result: dict) -> list[str]:
    """Why this run's figures must not replace the committed ones (empty: they may)."""
    reasons = []
    probe = result["machine"]["start_probe"]
    if probe["busy"]:
        reasons.append(
            f"at start, other processes used {probe['other_cores']:.3f} cores (busy above {rounds.BUSY_OTHER_CORES})"
        )
    marked, total = result["measurements_busy"]
    if total and marked / total > rounds.MAX_BUSY_SHARE:
        reasons.append(f"{marked} of {total} measurements were marked busy (more than {rounds.MAX_BUSY_SHARE:.0%})")
    unmeasured = sum(g["status"] == NOT_MEASURED_BUSY for g in result["goals"])
    if unmeasured:
        reasons.append(f"{unmeasured} of {len(result['goals'])} goals not measured (machine busy)")
    return reasons


def cores_per_gpu(result: dict) -> list[dict]:
    """CPU cores (of this machine) each method needs to feed one GPU at 224x224, from its CPU ms per image
    on 1 core (the cost of one image when nothing else shares the core)."""
    methods = result["input_pipeline"]["1"]["methods"]
    return [
        {
            "method": name,
            "cpu_ms_per_image": m["cpu_ms_per_image"],
            "cores_per_a100": round(A100_IMAGES_PER_SECOND * m["cpu_ms_per_image"] / 1000, 1),
            "cores_per_h100_estimate": round(H100_IMAGES_PER_SECOND_ESTIMATE * m["cpu_ms_per_image"] / 1000, 1),
        }
        for name, m in methods.items()
    ]


# --------------------------------------------------------------------------- markdown


def markdown(result: dict) -> str:
    sections = [
        _header(result),
        _goals(result),
        _inputs(result),
        _training(result),
        _feature_cache(result),
        _startup(result),
        _communication(result),
        _time_to_accuracy(result),
        finetune.markdown_lines(result),
        plan_check.markdown_lines(result),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


HOW_FIGURES_ARE_TAKEN = (
    "How figures are taken: every ratio is the median of at least {min_rounds} alternating rounds (each round "
    "measures every side once, in a rotated order, so drift of the machine hits both sides of a ratio), shown "
    "with its spread: the min-max of the per-round ratios. Around every measurement the bench reads the kernel's "
    "CPU accounting (/proc/stat) of the CPUs the measuring process was given (`os.sched_getaffinity`) and the "
    "process's own CPU time; a measurement is **marked busy** when other processes used more than "
    f"{rounds.BUSY_OTHER_CORES} cores on average during it (non-idle CPU time, steal included, minus the "
    "process's own, over wall time), or when the process got fewer cores than it asked for. A round's ratio "
    "counts only when neither side is marked; rounds go on (up to {max_rounds}) until {min_rounds} are unmarked; "
    'a goal is met or missed only from unmarked rounds, else it reads "not measured (machine busy)". '
    "One-run figures (feature cache, time to accuracy, `trainer plan` against a run) have no spread and count "
    "only when their whole run was unmarked; the fine-tuning cache's figure is the median of its alternating pairs "
    "of real runs, counted only when every pair is unmarked. `trainer bench` probes the machine for "
    f"{rounds.PROBE_SECONDS:.0f} s before it starts, and refuses to overwrite existing result files when the "
    f"machine is busy at start, when more than {rounds.MAX_BUSY_SHARE:.0%} of the measurements were marked, or "
    "when a goal could not be measured for load (it writes `*.busy.md`/`*.busy.json` beside them instead), "
    "unless `--allow-busy` is given."
)


def _header(r: dict) -> list[str]:
    machine, images, load = r["machine"], r["image_set"], r["machine"]["load_average_start"]
    quick = " **Quick mode: tiny sizes, figures meaningless.**" if r["mode"] == "quick" else ""
    settings = r["settings"]
    marked, total = r["measurements_busy"]
    return [
        "# Benchmarks",
        "",
        *_busy_banner(r),
        "Generated by `trainer bench --out docs/benchmarks.json --table docs/benchmarks.md` "
        f"({r['mode']} mode, {r['created']}, {r['seconds']:.0f} s); do not edit by hand.{quick} "
        "How each figure is taken, what the product does to reach it, and what to expect on GPUs: "
        "[performance.md](performance.md). Raw samples, each with its load: [benchmarks.json](benchmarks.json).",
        "",
        HOW_FIGURES_ARE_TAKEN.format(min_rounds=settings["min_rounds"], max_rounds=settings["max_rounds"]),
        "",
        f"Machine: {machine['cpus_usable']} usable CPU cores ({machine['cpu_model'] or 'unknown model'}), no GPU; "
        f"TensorFlow {r['versions'].get('tensorflow')}. Other processes' load at start (probe): "
        f"{machine['start_probe']['other_cores']:.2f} cores; load average at start {load[0]:.1f}, at end "
        f"{machine['load_average_end'][0]:.1f}. Measurements marked busy: {marked} of {total}.",
        "",
        f"Image set: {images['images']} generated JPEGs, mean size {images['mean_size'][0]}x{images['mean_size'][1]}, "
        f"{images['kb']['min']:.0f}-{images['kb']['max']:.0f} KB (mean {images['kb']['mean']:.0f} KB), "
        "prepared into TFRecord shards with `trainer prepare` (80% train, 20% validation), which stores them "
        "scaled to the model input they are prepared for (`prepare.image_size`: a 256 px shorter side for the "
        "224 px figures, 37 px for the 32 px ones; trainer.data.scale).",
        "",
    ]


def _busy_banner(r: dict) -> list[str]:
    reasons = r.get("busy_reasons") or []
    if not reasons:
        return []
    forced = " (written anyway: `--allow-busy`)" if r.get("forced") else ""
    return [
        f"**Taken on a busy machine{forced}: these figures do not reproduce and must not replace the committed "
        "ones.** Why: " + "; ".join(reasons) + ".",
        "",
    ]


def _goals(r: dict) -> list[str]:
    lines = [
        "## Goals",
        "",
        "| goal | target | measured (median) | spread (min-max of per-round ratios) | rounds used / busy | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for g in r["goals"]:
        lines.append(
            f"| {g['goal']} | {g['target']} | {_x(g['measured'])} | {_spread(g)} | "
            f"{g['rounds'] - g['rounds_busy']} / {g['rounds_busy']} | {_status(g)} |"
        )
    lines.append("")
    misses = [g for g in r["goals"] if g["status"] == "missed"]
    for g in misses:
        lines.append(f"- Missed: {g['goal']} ({g['measured']:.2f}x). What separates the two: {g['why_they_differ']}")
    if misses:
        lines.append("")
    return lines


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _spread(g: dict) -> str:
    if g["kind"] == "one run":
        return "- (one run)"
    spread = g["spread_min_max"]
    return "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}x"


def _status(g: dict) -> str:
    if g["status"] == "missed" and g.get("over_by") is not None:
        return f"**missed**, over by {g['over_by']}"
    if g["status"] == "missed":
        return f"**missed**, short by {g['short_by']}"
    return g["status"]


def _inputs(r: dict) -> list[str]:
    per_cores = r["input_pipeline"]
    counts = sorted(per_cores, key=int)
    any_run = per_cores[counts[0]]
    head = "| method | " + " | ".join(f"{c} core(s): images/s | CPU ms/image | cores used" for c in counts) + " |"
    lines = [
        f"## 1. Input pipeline (measured), {any_run['image_size']}x{any_run['image_size']} outputs, batch "
        f"{any_run['batch']}",
        "",
        f"Medians over unmarked rounds ({_round_counts(per_cores, counts)}) "
        f"of {any_run['images_per_measurement']} images per method; CPU ms/image counts every thread of the "
        "measuring process; cores used = CPU time / wall time. A figure in *italics* comes from busy rounds only. "
        "The limit (d) is the limit candidate with the highest median.",
        "",
        head,
        "|---|" + "---|---|---|" * len(counts),
    ]
    for method, label in METHOD_LABELS.items():
        cells = [_method_cells(per_cores[c]["methods"][method]) for c in counts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for c in counts:
        p = per_cores[c]
        lines.append(
            f"- {c} core(s): limit (d) = {METHOD_TAGS[p['limit_method']]}; "
            f"(c)/(d) {_ratio(p['product_vs_limit'])}, (c)/(b) {_ratio(p['product_vs_image_dataset'])}, "
            f"(c)/(a) {_ratio(p['product_vs_generator'])}"
        )
    lines += ["", *_cores_per_gpu(r)]
    return lines


def _round_counts(per_cores: dict, counts: list[str]) -> str:
    return ", ".join(f"{c} core(s): {per_cores[c]['rounds']} rounds" for c in counts)


def _method_cells(m: dict) -> str:
    cells = f"{m['images_per_second']:.0f} | {m['cpu_ms_per_image']:.2f} | {m['cores_used']:.2f}"
    return " | ".join(f"*{c}*" for c in cells.split(" | ")) if m["from_busy_only"] else cells


def _ratio(figure: dict) -> str:
    spread = f"min-max {figure['min']:.2f}-{figure['max']:.2f}" if figure["min"] is not None else "no unmarked round"
    median = f"**{figure['median']:.2f}x**" if figure["median"] is not None else "not measured (machine busy)"
    return f"{median} ({spread}; {figure['rounds'] - figure['rounds_busy']} of {figure['rounds']} rounds unmarked)"


def _cores_per_gpu(r: dict) -> list[str]:
    lines = [
        "CPU cores of this machine needed to feed one GPU at 224x224 (CPU ms/image on 1 core x the GPU's "
        f"VGG16 training rate): A100 at {A100_IMAGES_PER_SECOND:.0f} img/s (fp16, tf_cnn_benchmarks as run by "
        f"Lambda Labs); H100 SXM at {H100_IMAGES_PER_SECOND_ESTIMATE} img/s, an **estimate**, not a published "
        "VGG16 figure: the A100's rate x the ratio of their dense fp16 peaks (989/312 TFLOPS, NVIDIA data "
        "sheets), an upper bound since CNN training gains less than the peak ratio.",
        "",
        "| method | CPU ms/image (1 core) | cores per A100 | cores per H100 (estimate) |",
        "|---|---|---|---|",
    ]
    for row in r["cores_per_gpu"]:
        lines.append(
            f"| {METHOD_TAGS[row['method']]} | {row['cpu_ms_per_image']:.2f} | "
            f"{row['cores_per_a100']:.1f} | {row['cores_per_h100_estimate']:.1f} |"
        )
    return [*lines, ""]


def _training(r: dict) -> list[str]:
    t = r["training_step"]
    return [
        f"## 2. Training step (measured), {t['image_size']}x{t['image_size']} inputs, batch {t['batch']}, {t['phase']}",
        "",
        "| feed | images/s (median of unmarked rounds) |",
        "|---|---|",
        f"| in-memory tensors (compute limit) | {_rate(t['synthetic_images_per_second'])} |",
        "| the product's pipeline (~500x375 JPEGs decoded on the same cores) | "
        f"{_rate(t['pipeline_images_per_second'])} |",
        "",
        f"Pipeline-fed / tensor-fed: {_ratio(t['pipeline_vs_synthetic'])}, alternating rounds of "
        f"{t['steps_per_measurement']} steps.",
        "",
    ]


def _rate(value: float | None) -> str:
    return "not measured (machine busy)" if value is None else f"{value:.1f}"


def _feature_cache(r: dict) -> list[str]:
    c = r["feature_cache"]
    uncached, cached = c["uncached_epoch_seconds_after_first"], c["cached_epoch_seconds_after_first"]
    return [
        f"## 3. Feature-extraction phase, `train.cache_frozen_features` off / on (measured, real `trainer train`, "
        f"{c['image_size']}x{c['image_size']}, batch {c['batch']}, {c['epochs']} epochs)",
        "",
        "| | epochs after the first: seconds each | whole phase, seconds |",
        "|---|---|---|",
        f"| cache off | {', '.join(f'{s:.2f}' for s in uncached)} | {c['uncached_phase_seconds']:.1f} |",
        f"| cache on | {', '.join(f'{s:.3f}' for s in cached)} | {c['cached_phase_seconds']:.1f} "
        f"(+ {c['cached_extraction_seconds'] or 0:.1f} s one-off extraction before epoch 1) |",
        "",
        f"Speed-up per epoch after the first: **{c['speedup_after_first_epoch']:.0f}x**. Epoch times include "
        "validation and callbacks (differences of metrics.jsonl epoch-end timestamps). One run each, not "
        f"rounds: {_stage_load(r['stage_load']['trainer_runs'])}.",
        "",
    ]


def _stage_load(load: dict) -> str:
    verdict = "**marked busy**, does not count toward its goal" if load["busy"] else "unmarked"
    return f"other processes used {load['other_cores']:.2f} cores on average during these runs ({verdict})"


def _startup(r: dict) -> list[str]:
    s = r["startup"]
    lines = [
        "## 4. Start-up and memory (measured, real `trainer train` processes)",
        "",
        "| run | seconds from process start to the end of the first training step | peak resident memory, MB |",
        "|---|---|---|",
        _startup_row("one worker", s["single_worker"]),
    ]
    lines += [_startup_row(f"two workers (MWMS), worker {i}", w) for i, w in enumerate(s["two_workers"])]
    if not s["two_workers"]:
        lines.append("| two workers (MWMS) | not run in quick mode | |")
    lines += [
        "",
        "Start-up includes Python and TensorFlow imports, reading the manifest, building the model, tracing "
        "the training step and the step itself; the two-worker runs also form the cluster. Both workers of a "
        "local two-worker run share the same 2 cores.",
        "",
    ]
    return lines


def _startup_row(name: str, s: dict) -> str:
    first = f"{s['seconds_to_first_step']:.1f}" if s["seconds_to_first_step"] is not None else "not seen"
    return f"| {name} | {first} | {s['peak_rss_mb']:.0f} |"


def _communication(r: dict) -> list[str]:
    comm = r["communication"]
    product = comm["product_model"]["bytes_per_step"]
    lines = [
        f"## 5. Communication volume (measured: counted from the real model, {comm['image_size']}x"
        f"{comm['image_size']}, default head, {comm['classes']} classes) and scaling (computed, not measured)",
        "",
        "| phase | trainable gradient bytes all-reduced per step |",
        "|---|---|",
    ]
    lines += [f"| {phase} | {nbytes / 1e6:.1f} MB |" for phase, nbytes in product.items()]
    classic = comm["vgg16_imagenet_top"]
    lines += [
        f"| for comparison: VGG16 with its ImageNet top (4096-4096-1000), whole network | "
        f"{classic['bytes_per_step'] / 1e6:.1f} MB |",
        "",
        "Computed scaling efficiency (lower bound: no overlap of all-reduce and compute; upper bound: perfect "
        f"overlap), ring all-reduce, one GPU per worker, {comm['assumptions']['per_gpu_batch']} images per GPU "
        "per step, per-GPU throughput from published VGG16 figures; model and sources in "
        "[performance.md](performance.md#communication-and-scaling).",
        "",
    ]
    for gpu in ("V100 fp32", "A100 fp16"):
        lines += _scaling_table(comm["scaling"], gpu)
    h, published = comm["horovod_model"], comm["horovod_published"]
    lines += [
        f"Published: {published['source']}: VGG16 {published['vgg16_scaling_efficiency']:.0%} scaling efficiency "
        f"at {published['gpus']} GPUs (ResNet-101 {published['resnet101_scaling_efficiency']:.0%}). This model "
        f"for that setting (VGG16 with its top, {h['workers']} workers, {h['link_gbps']} Gb/s, {h['gpu']}): "
        f"{h['efficiency_no_overlap']:.0%}-{h['efficiency_full_overlap']:.0%}.",
        "",
    ]
    return lines


def _scaling_table(rows: list[dict], gpu: str) -> list[str]:
    selected = [row for row in rows if row["gpu"] == gpu]
    columns = sorted({(row["link_gbps"], row["workers"]) for row in selected})
    lines = [
        f"{gpu}:",
        "",
        "| model, phase | MB/step | " + " | ".join(f"{w} workers, {g} Gb/s" for g, w in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    keys = list(dict.fromkeys((row["model"], row["phase"]) for row in selected))
    for model, phase in keys:
        mine = [row for row in selected if (row["model"], row["phase"]) == (model, phase)]
        cells = {(row["link_gbps"], row["workers"]): row for row in mine}
        any_row = next(iter(cells.values()))
        values = [f"{cells[c]['efficiency_no_overlap']:.0%}-{cells[c]['efficiency_full_overlap']:.0%}" for c in columns]
        lines.append(f"| {model}, {phase} | {any_row['mb_per_step']:.1f} | " + " | ".join(values) + " |")
    lines.append("")
    return lines


def _time_to_accuracy(r: dict) -> list[str]:
    t = r.get("time_to_accuracy")
    if not t:
        return []
    product, notebook, data = t["product"], t["notebook"], t["dataset"]
    images = data["images"]
    return [
        f"## 6. Time to accuracy on real images (measured, one run each, one after the other): "
        f"{data['name']}, {data['image_size']}x{data['image_size']}",
        "",
        f"Real scanned digits no one here made ({images['train']} train, {images['validation']} validation, "
        f"{images['test']} test images, 10 classes), random initial weights on both sides, the same cores. "
        "Seconds are wall clock from command start to the test figure.",
        "",
        "| run | test accuracy | epochs run | seconds |",
        "|---|---|---|---|",
        f"| this product, defaults (`{' '.join(product['settings'])}`, recipe {product['recipe']}): "
        f"`trainer prepare` + `trainer train`, one worker | {product['test_accuracy']:.3f} | "
        f"{product['epochs_run']} | {product['seconds']:.0f} ({product['prepare_seconds']:.0f} + "
        f"{product['train_seconds']:.0f}) |",
        f"| the notebook recipe (ImageDataGenerator + `model.fit` as written, trainer/bench/notebook.py), at the "
        f"same {data['image_size']}x{data['image_size']} input (the notebook's own 224 would take hours here) | "
        f"{notebook['test_accuracy']:.3f} | {notebook['epochs_run']} | {notebook['seconds']:.0f} |",
        "",
        f"Notebook seconds / product seconds: **{t['time_ratio']:.2f}x**; test accuracy, product minus notebook: "
        f"**{t['accuracy_difference']:+.3f}**. "
        + (
            f"The product's validation accuracy first reached the notebook's test accuracy at epoch "
            f"{product['epoch_reaching_notebook_accuracy']}, {product['seconds_to_notebook_accuracy']:.0f} s after "
            f"its start ({notebook['seconds'] / product['seconds_to_notebook_accuracy']:.1f}x sooner than the "
            "notebook's whole run)."
            if product.get("seconds_to_notebook_accuracy")
            else "The product's validation accuracy never reached the notebook's test accuracy."
        )
        + f" One run each, not rounds: {_stage_load(r['stage_load']['time_to_accuracy'])}.",
        "",
    ]
