"""`trainer plan`: how long a run will take, in GPU-hours and money, before it is launched.

Not the run's own plan (trainer.train.plan: recipe and automatic choices); this is its cost.
For a prepared dataset, the configuration's phases, a GPU type and several worker counts it
prints the expected training time per epoch and in total, GPU-hours, cost, the all-reduce's
scaling efficiency and the host CPU cores each GPU needs to be fed.

The model (one GPU, or one CPU process, per worker; synchronous data parallelism)
-----------------------------------------------------------------------------------
Per phase, with per-replica batch ``b`` and ``n`` workers:

    steps per epoch = train.steps_per_epoch, else train images // (b x n)
    step seconds    = compute + all-reduce           (no overlap: MWMS reduces after backward)
    all-reduce      = 2 (n - 1) / n x gradient bytes / link bandwidth      (ring all-reduce)
    efficiency      = compute / step seconds         (per-worker throughput vs one worker)
    epoch seconds   = steps x step seconds + backups x backup seconds  (metrics.jsonl's train_seconds)
    backups         = (steps - 1) // train.backup_every_steps  (the epoch-end backup is not in train_seconds)
    validation pass = ceil(validation images / (b x n)) evaluation steps
    phase seconds   = epochs x (epoch + validation pass) + first-step overhead (tracing)

Gradient bytes are the phase's trainable float32 variables, counted from the model built by
trainer.model.build_model for this dataset's classes, image size and head (the frozen-base phase
all-reduces only the head; block5 + head is ~29 MB; the classic VGG16 with its 4096-wide top
would be 553 MB, this product's GAP head keeps the whole network at ~59 MB).

Compute per step comes from one of two sources, and the output says which:

- **probe** (``--probe``): a few real training steps of every phase on this machine, with the
  real input pipeline and model (as the run's FirstStepsEstimate callback times them), plus a
  few evaluation steps, one backup, and the pipeline's CPU milliseconds per image. With
  ``--local`` the n workers share this machine, as `trainer launch` runs them: each worker's
  compute, evaluation and backups take n times the probe's (the probe had every core), the
  all-reduce crosses loopback. Not modelled there: on oversubscribed cores (load above ~3 per
  core) the workers' meeting at every all-reduce waits for the scheduler, and a 2-worker run
  took up to 2-4x the prediction here (docs/operations.md, "Before launching").
- **cited**: published VGG16 training throughput for the whole network at 224x224
  (tf_cnn_benchmarks as run by Lambda Labs: V100 249 img/s fp32, 456 fp16; A100 1190 fp16),
  scaled by the phase's share of a full training step's multiply-accumulates:

      forward  = every conv block's forward GMAC at the model input (1.94/2.77/4.62/4.62/1.39
                 at 224x224; counted from the built model's layer shapes)
      backward = 2 x forward of each trainable block (weight and input gradients)
                 + 1 x forward of each frozen block above the lowest trainable one (the input
                   gradient must pass through it); nothing below it
      seconds per image = (forward + backward) / (3 x forward at 224x224) / published img/s

  A backup writes every weight and the optimizer's slots (float32) at BACKUP_WRITE_MB_S.
  H100, L4 and T4 have no published figure here: theirs are the A100's scaled by the vendors'
  peak dense fp16 tensor TFLOPS (the same rule puts the V100 at 477 against its published 456).

Not modelled: start-up (imports, cluster forming: ~10-15 s), the final evaluation and export,
the feature caches (train.cache_frozen_features makes a frozen phase's later epochs ~14x faster;
train.cache_frozen_blocks skips the frozen blocks of a fine-tuning phase; the output notes either),
stragglers, and a GPU underused by small inputs (cited figures scale down with pixels).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from trainer.config import VGG16_BLOCKS, Config
from trainer.data.manifest import Manifest
from trainer.errors import ConfigError
from trainer.train.plan import duration

#: Sum of VGG16's conv blocks' forward GMAC per 224x224 image (NOTES.md section 2).
FULL_FORWARD_GMAC_224 = 1.94 + 2.77 + 4.62 + 4.62 + 1.39
LAMBDA = "tf_cnn_benchmarks VGG16 training as published by Lambda Labs (NOTES.md section 2)"
DERIVED = "derived: A100's 1190 img/s x peak dense fp16 tensor TFLOPS ratio ({tflops} vs 312; NVIDIA datasheets)"


@dataclass(frozen=True)
class Accelerator:
    name: str
    images_per_second: float | None  # whole-network VGG16 training at 224x224, mixed precision
    throughput_source: str
    price_per_hour: float  # USD per GPU (or CPU worker) hour
    price_source: str
    bandwidth_gbps: float  # default link per worker


_GCP = "GCP on-demand list price, us-central1, 2024 (recalled, not verified offline: override with --price)"
ACCELERATORS = {
    "a100": Accelerator("NVIDIA A100 40GB", 1190.0, LAMBDA, 3.67, f"{_GCP}; a2-highgpu-1g", 25.0),
    "h100": Accelerator("NVIDIA H100 80GB", 1190.0 * 989 / 312, DERIVED.format(tflops=989), 11.06,
                        f"{_GCP}; a3-highgpu-8g / 8", 25.0),
    "l4": Accelerator("NVIDIA L4", 1190.0 * 121 / 312, DERIVED.format(tflops=121), 0.71,
                      f"{_GCP}; g2-standard-4", 25.0),
    "t4": Accelerator("NVIDIA T4", 1190.0 * 65 / 312, DERIVED.format(tflops=65), 0.54,
                      f"{_GCP}; T4 0.35 + n1-standard-4 0.19", 25.0),
    "v100": Accelerator("NVIDIA V100 16GB", 456.0, LAMBDA, 2.86, f"{_GCP}; V100 2.48 + n1-standard-8 0.38", 25.0),
    "cpu": Accelerator("CPU worker", None, "no published figure: measure with --probe", 0.10,
                       f"{_GCP}; n2-standard-2 per worker-hour", 8.0),
}  # fmt: skip
#: V100's published fp32/fp16 ratio (249/456), for runs with runtime.mixed_precision off.
FP32_FACTOR = 249.0 / 456.0
#: Input pipeline CPU ms per image at 224x224 (docs/benchmarks.md section 1, (c), 1 core), from JPEGs stored
#: by `trainer prepare` at ~306x256 (the benchmark's ~477x399 images at the default prepare.image_size 224).
PIPELINE_MS_224 = 0.57
PIPELINE_STORED_PIXELS = 306 * 256
#: Link bandwidth (Gb/s) of --local workers: TF's gRPC ring over loopback, CPU-bound; fitted to a
#: 2-worker `trainer launch` of the tiny test run here (2 cores, load ~4): documented, not general.
LOOPBACK_GBPS = 8.0
#: Assumed checkpoint write rate without a probe (MB/s): a local SSD or one gs:// upload stream.
BACKUP_WRITE_MB_S = 200.0


@dataclass
class PhaseCost:
    """What one phase needs per replica step, from the probe or from cited figures."""

    name: str
    epochs: int
    trainable_blocks: list[str]
    gradient_bytes: int
    step_seconds: float  # compute of one replica step (per-replica batch), this worker count aside
    eval_step_seconds: float  # one evaluation batch (per-replica batch), forward only
    first_step_overhead: float  # tracing etc. on a phase's first step (probe only)
    backup_seconds: float  # one resumable backup (train.backup_every_steps), model and optimizer


@dataclass
class Inputs:
    """Everything `trainer plan` was given, resolved."""

    gpu: str
    workers: list[int]
    price_per_hour: float
    price_source: str
    bandwidth_gbps: float
    local: bool
    source: str  # "probe" or "cited"
    batch_per_replica: int
    image_size: int
    train_images: int
    validation_images: int
    steps_per_epoch_setting: int
    backup_every_steps: int
    pipeline_ms_per_image: float
    pipeline_source: str
    phases: list[PhaseCost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the figures leave out for this configuration


# --------------------------------------------------------------------------- the model


def backward_gmac(block_gmac: dict[str, float], trainable: list[str]) -> float:
    """Backward multiply-accumulates: 2x each trainable block, 1x each frozen block above the lowest one."""
    if not trainable:
        return 0.0
    lowest = min(VGG16_BLOCKS.index(b) for b in trainable)
    above = VGG16_BLOCKS[lowest:]
    return sum(block_gmac[b] * (2.0 if b in trainable else 1.0) for b in above)


def cited_seconds_per_image(block_gmac: dict[str, float], trainable: list[str], images_per_second: float) -> float:
    """A training step's seconds per image: the phase's share of a full 224x224 step at the published rate."""
    forward = sum(block_gmac.values())
    return (forward + backward_gmac(block_gmac, trainable)) / (3 * FULL_FORWARD_GMAC_224) / images_per_second


def ring_seconds(nbytes: int, workers: int, link_gbps: float) -> float:
    return 2 * (workers - 1) / workers * nbytes / (link_gbps * 1e9 / 8)


def steps_per_epoch(inputs: Inputs, workers: int) -> int:
    if inputs.steps_per_epoch_setting:
        return inputs.steps_per_epoch_setting
    return max(1, inputs.train_images // (inputs.batch_per_replica * workers))


def phase_row(inputs: Inputs, phase: PhaseCost, workers: int) -> dict[str, Any]:
    """One phase at one worker count: the model's figures."""
    sharing = workers if inputs.local else 1  # --local: n processes share this machine's cores
    compute = phase.step_seconds * sharing
    comm = ring_seconds(phase.gradient_bytes, workers, inputs.bandwidth_gbps)
    step = compute + comm
    steps = steps_per_epoch(inputs, workers)
    eval_steps = math.ceil(inputs.validation_images / (inputs.batch_per_replica * workers))
    validation = eval_steps * phase.eval_step_seconds * sharing
    backups = (steps - 1) // inputs.backup_every_steps
    epoch = steps * step + backups * phase.backup_seconds * sharing
    return {
        "phase": phase.name,
        "workers": workers,
        "epochs": phase.epochs,
        "steps_per_epoch": steps,
        "gradient_mb": round(phase.gradient_bytes / 1e6, 2),
        "compute_seconds_per_step": round(compute, 4),
        "allreduce_seconds_per_step": round(comm, 4),
        "scaling_efficiency": round(compute / step, 3),
        "images_per_second": round(steps * inputs.batch_per_replica * workers / epoch, 1),
        "train_seconds_per_epoch": round(epoch, 3),
        "first_epoch_train_seconds": round(epoch + phase.first_step_overhead, 3),
        "validation_seconds_per_epoch": round(validation, 3),
        "phase_seconds": round(phase.epochs * (epoch + validation) + phase.first_step_overhead, 2),
    }


def plan_rows(inputs: Inputs) -> list[dict[str, Any]]:
    """Per worker count: its phases, total time, GPU-hours, cost and the input pipeline's cores per GPU."""
    rows = []
    for workers in inputs.workers:
        phases = [phase_row(inputs, phase, workers) for phase in inputs.phases if phase.epochs]
        seconds = sum(p["phase_seconds"] for p in phases)
        gpu_hours = seconds / 3600 * workers
        fastest = max((p["images_per_second"] / workers for p in phases), default=0.0)
        rows.append(
            {
                "workers": workers,
                "phases": phases,
                "total_seconds": round(seconds, 1),
                "gpu_hours": round(gpu_hours, 4),
                "cost": round(gpu_hours * inputs.price_per_hour, 4),
                "cores_per_gpu": round(fastest * inputs.pipeline_ms_per_image / 1000, 2),
            }
        )
    return rows


# --------------------------------------------------------------------------- inputs


def parse_workers(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(
            f"--workers {text!r}: expected worker counts >= 1 separated by commas, e.g. --workers 1,2,4,8"
        )
    return sorted(set(counts))


def price_for(gpu: str, overrides: list[str], prices_file: str | None) -> tuple[float, str]:
    """The price per GPU-hour: --price GPU=USD wins over --prices FILE, which wins over the table."""
    table = {name: (a.price_per_hour, a.price_source) for name, a in ACCELERATORS.items()}
    if prices_file:
        table.update({name: (usd, f"from {prices_file}") for name, usd in _read_prices(prices_file).items()})
    for item in overrides:
        name, usd = _price_item(item)
        table[name] = (usd, "given with --price")
    return table[gpu]


def _price_item(item: str) -> tuple[str, float]:
    name, sep, text = item.partition("=")
    try:
        usd = float(text)
    except ValueError:
        usd = -1.0
    if not sep or name.strip() not in ACCELERATORS or usd < 0:
        raise ConfigError(f"--price {item!r}: expected GPU=USD_PER_HOUR with GPU one of {', '.join(ACCELERATORS)}")
    return name.strip(), usd


def _read_prices(path: str) -> dict[str, float]:
    import yaml

    from trainer import storage

    try:
        data = yaml.safe_load(storage.read_text(path))
    except FileNotFoundError:
        raise ConfigError(
            f"--prices {path}: no such file; pass a YAML file mapping GPU names to USD per hour"
        ) from None
    except yaml.YAMLError:
        raise ConfigError(f"--prices {path}: not valid YAML; write one `gpu: usd_per_hour` per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--prices {path}: expected a mapping such as `a100: 3.67`, got {type(data).__name__}")
    return dict(_price_item(f"{name}={usd}") for name, usd in data.items())


def pipeline_cost_cited(manifest: Manifest) -> tuple[float, str]:
    """CPU ms per image: the benchmark's figure, scaled by the pixels the dataset stores (decoding dominates)."""
    from trainer.data import scale
    from trainer.data.stats import ImageStats

    stats = ImageStats.from_manifest_extra(manifest.extra)
    if stats is None:
        return PIPELINE_MS_224, "docs/benchmarks.md section 1, (c) at 1 core (~306x256 JPEGs)"
    side = scale.stored_side(int(manifest.extra.get(scale.PREPARED_FOR) or 0))
    width, height = scale.stored_size(stats.median_width, stats.median_height, side) or (
        stats.median_width,
        stats.median_height,
    )
    ms = PIPELINE_MS_224 * max(width * height / PIPELINE_STORED_PIXELS, 0.1)
    return ms, (
        f"docs/benchmarks.md section 1, (c) at 1 core, {PIPELINE_MS_224} ms for ~306x256 JPEGs, scaled to this "
        f"dataset's median stored image, {width}x{height}"
    )


def gradient_and_gmac(cfg: Config, manifest: Manifest) -> tuple[dict[str, int], dict[str, float], int]:
    """Per phase its trainable gradient bytes, per block its forward GMAC, and all weights' bytes: from the model."""
    from trainer.bench.comms import conv_block_gmac, gradient_bytes
    from trainer.config import ModelConfig
    from trainer.model import base_of, build_model, set_trainable_blocks

    model = build_model(
        manifest.num_classes, cfg.data.image_size, ModelConfig(weights="none", head=cfg.model.head), seed=0
    )
    volumes = {name: gradient_bytes(model, p.unfreeze_blocks, set_trainable_blocks) for name, p in cfg.phases.items()}
    return volumes, conv_block_gmac(base_of(model)), 4 * int(model.count_params())


def backup_bytes(weights: int, trainable: int, optimizer: str) -> int:
    """A backup's size: every weight, plus the optimizer's slots per trainable weight (Adam 2, else 1)."""
    return weights + (2 if optimizer == "adam" else 1) * trainable


def cited_phases(cfg: Config, manifest: Manifest, accelerator: Accelerator) -> list[PhaseCost]:
    assert accelerator.images_per_second is not None  # estimate() refuses --gpu cpu without --probe
    rate = accelerator.images_per_second * (FP32_FACTOR if cfg.runtime.mixed_precision == "off" else 1.0)
    volumes, block_gmac, total_bytes = gradient_and_gmac(cfg, manifest)
    batch = cfg.train.batch_size_per_replica
    forward_per_image = sum(block_gmac.values()) / (3 * FULL_FORWARD_GMAC_224) / rate
    return [
        PhaseCost(
            name,
            phase.epochs,
            list(phase.unfreeze_blocks),
            volumes[name],
            batch * cited_seconds_per_image(block_gmac, phase.unfreeze_blocks, rate),
            batch * forward_per_image,
            0.0,
            backup_bytes(total_bytes, volumes[name], phase.optimizer.name) / (BACKUP_WRITE_MB_S * 1e6),
        )
        for name, phase in cfg.phases.items()
    ]


# --------------------------------------------------------------------------- the probe


def probe_phases(cfg: Config, manifest: Manifest, steps: int) -> tuple[list[PhaseCost], float]:
    """Time ``steps`` real training steps (after a tracing step) of every phase, and a few evaluation
    steps, on this machine with the real pipeline and model; also the pipeline's CPU ms per image."""
    import tensorflow as tf

    from trainer.bench.comms import gradient_bytes
    from trainer.config import ModelConfig
    from trainer.data import pipeline
    from trainer.data.stats import ImageStats
    from trainer.model import build_model, set_trainable_blocks
    from trainer.train import plan as plan_lib
    from trainer.train.phases import compile_for_phase, plan_phase

    _use_run_precision(cfg)
    batch = cfg.train.batch_size_per_replica
    resolved, _ = plan_lib.make_plan(cfg, ImageStats.from_manifest_extra(manifest.extra), batch, steps)
    files = pipeline.shard_paths(cfg.data.dataset, manifest, "train")
    data = pipeline.training_dataset(files, resolved.data, manifest.num_classes, batch, cfg.runtime.seed, False)
    ms_per_image = _pipeline_cpu_ms(data, batches=max(steps, 4), batch=batch)
    # Random weights: the speed is the same, and nothing is downloaded.
    model_cfg = ModelConfig(weights="none", head=resolved.model.head)
    model = build_model(manifest.num_classes, cfg.data.image_size, model_cfg, seed=cfg.runtime.seed)
    costs = []
    for name, phase in resolved.phases.items():
        volume = gradient_bytes(model, phase.unfreeze_blocks, set_trainable_blocks)
        if not phase.epochs:
            costs.append(PhaseCost(name, 0, list(phase.unfreeze_blocks), volume, 0.0, 0.0, 0.0, 0.0))
            continue
        compile_for_phase(
            model, plan_phase(name, resolved, steps + 1, batch, 0), resolved, tf.distribute.get_strategy()
        )
        costs.append(_probe_phase(model, name, phase, data, steps, volume))
    return costs, ms_per_image


def _probe_phase(model, name: str, phase, data, steps: int, volume: int) -> PhaseCost:
    """One compiled phase: its steps, evaluation steps and a backup, timed."""
    first, step = _time_fit(model, data, steps)
    eval_step = _time_evaluate(model, data, max(2, steps // 2))
    blocks = list(phase.unfreeze_blocks)
    return PhaseCost(name, phase.epochs, blocks, volume, step, eval_step, first - step, _time_backup(model))


def _use_run_precision(cfg: Config) -> None:
    """The mixed-precision policy the run would have on this (GPU-less) machine."""
    import tf_keras

    from trainer.strategy import precision_policy

    policy = precision_policy(cfg.runtime.mixed_precision, num_gpus=0)
    if policy is not None:
        tf_keras.mixed_precision.set_global_policy(policy)


def _time_fit(model, data, steps: int) -> tuple[float, float]:
    """(the first step's seconds from the epoch's start, the mean of the following steps)."""
    clock = _step_clock()
    model.fit(data, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[clock])
    return clock.first, clock.mean_after_first


def _time_evaluate(model, data, steps: int) -> float:
    clock = _step_clock()
    model.evaluate(data, steps=steps + 1, verbose=0, callbacks=[clock])
    return clock.mean_after_first


def _time_backup(model) -> float:
    """Seconds of one resumable backup of ``model`` (the second of two: the first sets the writer up)."""
    import tempfile

    from trainer.train.backup import PhaseBackup, Position

    with tempfile.TemporaryDirectory(prefix="trainer-plan-") as directory:
        backup = PhaseBackup(directory, model, keep=1, is_chief=True)
        backup.save(Position(0, 1, 1))
        started = time.perf_counter()
        backup.save(Position(0, 2, 2))
        seconds = time.perf_counter() - started
        backup.close()
    return seconds


def _pipeline_cpu_ms(data, batches: int, batch: int) -> float:
    """CPU milliseconds (every thread of this process) per image the pipeline hands out, after warm-up."""
    iterator = iter(data)
    next(iterator)
    started = time.process_time()
    for _ in range(batches):
        next(iterator)
    return (time.process_time() - started) * 1000 / (batches * batch)


def _step_clock():
    """A callback timing from the epoch's (or evaluation's) start to each batch's end, as EpochTimer does."""
    import tf_keras as keras

    class StepClock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends: list[float] = []
            self.start = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        def on_test_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

        @property
        def first(self) -> float:
            return self.ends[0] - self.start

        @property
        def mean_after_first(self) -> float:
            return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)

    return StepClock()


# --------------------------------------------------------------------------- the command


def estimate(cfg: Config, args) -> tuple[Inputs, list[dict[str, Any]]]:
    """The plan of `trainer plan` for the parsed command line ``args`` and configuration ``cfg``."""
    from trainer.data.manifest import read_manifest

    if args.gpu not in ACCELERATORS:
        raise ConfigError(f"--gpu {args.gpu!r}: expected one of {', '.join(ACCELERATORS)}")
    if args.local and args.gpu != "cpu":
        raise ConfigError("--local models workers sharing this machine's CPU; use it with --gpu cpu")
    if args.probe and args.gpu != "cpu":
        raise ConfigError(f"--probe measures this machine, which has no {args.gpu}; use --gpu cpu, or drop --probe")
    if args.probe and args.probe_steps < 2:
        raise ConfigError(f"--probe-steps {args.probe_steps}: a probe needs at least 2 timed steps per phase")
    accelerator = ACCELERATORS[args.gpu]
    if not args.probe and accelerator.images_per_second is None:
        raise ConfigError(f"--gpu {args.gpu} has no published throughput; add --probe to measure this machine")
    workers = parse_workers(args.workers)
    if args.bandwidth_gbps < 0:
        raise ConfigError(f"--bandwidth-gbps {args.bandwidth_gbps:g}: expected a link speed > 0 (0 = the default)")
    price, price_source = price_for(args.gpu, args.price, args.prices)
    manifest = read_manifest(cfg.data.dataset)
    bandwidth = args.bandwidth_gbps or (LOOPBACK_GBPS if args.local else accelerator.bandwidth_gbps)
    if args.probe:
        phases, pipeline_ms = probe_phases(cfg, manifest, args.probe_steps)
        pipeline_source = "measured by the probe (CPU time of every thread, this machine)"
    else:
        phases = cited_phases(cfg, manifest, accelerator)
        pipeline_ms, pipeline_source = pipeline_cost_cited(manifest)
    inputs = Inputs(
        args.gpu, workers, price, price_source, bandwidth, args.local, "probe" if args.probe else "cited",
        cfg.train.batch_size_per_replica, cfg.data.image_size, *split_sizes(manifest, args.images),
        cfg.train.steps_per_epoch, cfg.train.backup_every_steps,
        round(pipeline_ms, 3), pipeline_source, phases, unmodelled(cfg, args.gpu),
    )  # fmt: skip
    return inputs, plan_rows(inputs)


def add_plan_arguments(parser) -> None:
    """`trainer plan`'s options (trainer.cli adds --config and --set)."""
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated (default 1,2,4,8)")
    parser.add_argument(
        "--gpu", default="a100", choices=list(ACCELERATORS), help="accelerator per worker (default a100)"
    )
    parser.add_argument(
        "--price", action="append", default=[], metavar="GPU=USD", help="USD per GPU-hour, over the table (repeatable)"
    )
    parser.add_argument("--prices", default=None, metavar="FILE", help="YAML file of `gpu: usd_per_hour`")
    parser.add_argument("--bandwidth-gbps", type=float, default=0.0, help="link per worker (default 25; --local 8)")
    parser.add_argument("--probe", action="store_true", help="measure a few real steps here (--gpu cpu)")
    parser.add_argument("--images", type=int, default=0, help="plan for N training images (default: the manifest's)")
    parser.add_argument("--probe-steps", type=int, default=8, help="timed steps per phase (default 8)")
    parser.add_argument("--local", action="store_true", help="the workers share this machine (`trainer launch`)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def split_sizes(manifest: Manifest, images: int) -> tuple[int, int]:
    """Training and validation images: the manifest's, or ``images`` with the manifest's validation share."""
    train, validation = manifest.split_size("train"), manifest.split_size("validation")
    if images < 0:
        raise ConfigError(f"--images {images}: expected a number of training images >= 1 (0 = the manifest's)")
    if not images:
        return train, validation
    return images, round(validation * images / train)


def unmodelled(cfg: Config, gpu: str) -> list[str]:
    """What the figures leave out that this configuration turns on."""
    notes = []
    if cfg.train.cache_frozen_features and any(p.epochs and not p.unfreeze_blocks for p in cfg.phases.values()):
        notes.append(
            "train.cache_frozen_features is on: a frozen-base phase's epochs after the first cost the head only "
            "(~14x faster here, docs/benchmarks.md section 3), shown at full cost"
        )
    if cfg.train.cache_frozen_blocks and any(p.epochs and p.unfreeze_blocks for p in cfg.phases.values()):
        notes.append(
            "train.cache_frozen_blocks is on: a phase training only top blocks skips the frozen blocks below "
            "them after its first epoch (see docs/performance.md), shown at full cost"
        )
    if gpu != "cpu" and cfg.data.image_size < 224:
        notes.append(
            f"data.image_size={cfg.data.image_size}: cited figures are scaled down by pixels; a GPU underused by "
            "small inputs will be slower than shown"
        )
    return notes


def plan_command(cfg: Config, args) -> None:
    inputs, rows = estimate(cfg, args)
    if args.json:
        print(json.dumps({"inputs": asdict(inputs), "rows": rows}, indent=2))
        return
    for line in table_lines(inputs, rows):
        print(line)


def table_lines(inputs: Inputs, rows: list[dict[str, Any]]) -> list[str]:
    accelerator = ACCELERATORS[inputs.gpu]
    source = (
        "measured: a probe of real training steps on this machine"
        + (", workers sharing its cores (--local)" if inputs.local else "")
        if inputs.source == "probe"
        else f"cited: {accelerator.images_per_second:.0f} img/s whole-network VGG16 at 224x224 "
        f"({accelerator.throughput_source}), scaled by each phase's FLOPs"
    )
    lines = [
        f"trainer plan: {inputs.train_images} training images at {inputs.image_size}x{inputs.image_size}, "
        f"{inputs.batch_per_replica} per replica; {accelerator.name} ({inputs.gpu}), one per worker",
        f"  throughput: {source}",
        f"  all-reduce: ring over {inputs.bandwidth_gbps:g} Gb/s per worker (--bandwidth-gbps)",
        f"  price: ${inputs.price_per_hour:g} per GPU-hour ({inputs.price_source})",
        f"  input pipeline: {inputs.pipeline_ms_per_image:.2f} CPU ms per image ({inputs.pipeline_source})",
        "",
        _row(["workers", "phase", "epochs", "steps/epoch", "s/step", "all-reduce", "scaling", "epoch", "phase"]),
    ]
    for row in rows:
        for p in row["phases"]:
            step = p["compute_seconds_per_step"] + p["allreduce_seconds_per_step"]
            lines.append(_row([
                str(row["workers"]), p["phase"], str(p["epochs"]), str(p["steps_per_epoch"]), f"{step:.3f}",
                f"{p['gradient_mb']:.1f} MB", f"{p['scaling_efficiency']:.0%}",
                duration(p["train_seconds_per_epoch"]), duration(p["phase_seconds"]),
            ]))  # fmt: skip
    lines += ["", _row(["workers", "total", "GPU-hours", "cost (USD)", "CPU cores per GPU"])]
    for row in rows:
        lines.append(_row([
            str(row["workers"]), duration(row["total_seconds"]), f"{row['gpu_hours']:.3g}", f"{row['cost']:.2f}",
            f"{row['cores_per_gpu']:.2f}",
        ]))  # fmt: skip
    lines += [f"note: {note}" for note in inputs.notes]
    lines.append(
        "epoch = training only (as metrics.jsonl's train_seconds); phase and total add validation passes and "
        "the first step's tracing; start-up, final evaluation and export are not counted"
    )
    return lines


def _row(cells: list[str]) -> str:
    widths = [7, 18, 6, 11, 7, 10, 7, 8, 8]
    return "  ".join(
        cell.rjust(width) if i != 1 else cell.ljust(width)
        for i, (cell, width) in enumerate(zip(cells, widths, strict=False))
    )
