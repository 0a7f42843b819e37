"""A GPU check: the product's model and training step on every GPU configuration it supports.

    scripts/gpu-check.sh [--steps 50] [--warmup 5] [--image-size 224] [--batch 64] [--json PATH]

Three runs, each in fresh processes (device set-up, the precision policy and the strategy must
come before TensorFlow runs anything), on synthetic data held in host memory (no input cost, so
the step is the limit), all at ``mixed_float16`` (what ``runtime.mixed_precision: auto`` picks on
GPUs):

* ``mirrored``: MirroredStrategy over every GPU of the machine (the chart's ``workers: 1,
  gpusPerWorker: N``);
* ``multi_worker_nccl``: 2 local MultiWorkerMirroredStrategy workers, the GPUs split between them,
  all-reducing over NCCL (``runtime.all_reduce: nccl``, built by trainer.strategy as a pod does);
* ``xla``: one GPU with the step compiled by XLA (``runtime.jit_compile: true``).

Each prints images/s, images/s per GPU and model FLOPs utilisation (MFU): the FLOPs the step
must do per image (forward of the whole model plus backward of its trainable part, counted from
the built model's layers) x images/s per GPU / the GPU's peak dense fp16 tensor FLOPS.

Without a GPU it says so in one line and exits 0 (writing nothing). ``--allow-cpu`` runs the same
code on CPU (2 logical CPU devices stand in for GPUs) so that tests/bench/test_gpu_check.py
proves the script works on a machine without GPUs; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from trainer.bench.comms import phase_compute_fraction
from trainer.cluster import make_tf_config
from trainer.contract import Env
from trainer.launch import free_ports
from trainer.supervisor import Child

RUNS = ("mirrored", "multi_worker_nccl", "xla")
CLASSES = 10  # a transfer-learning head, as in the bench
RESULT = "gpu-check-result "  # the prefix of a worker's one result line on stdout
CPU_DEVICES = 2  # --allow-cpu: logical CPU devices standing in for GPUs

#: Peak dense (no sparsity) fp16 tensor-core TFLOPS by GPU name, most specific name first. From
#: NVIDIA's data sheets: T4 (65, FP16 mixed precision), L4 (121 = 242 with sparsity / 2), A10 (125;
#: AWS's A10G has no NVIDIA data sheet: the A10's figure is used, unverified), A100 SXM and PCIe
#: (312), H100 SXM (989), H100 PCIe (756), H100 NVL (835), V100 SXM2 (125). bf16 is the same
#: figure on A100/H100/L4/A10; T4 and V100 have no bf16.
PEAK_FP16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("T4", 65.0),
    ("V100", 125.0),
)


def peak_tflops(gpu_name: str) -> float | None:
    for name, tflops in PEAK_FP16_TFLOPS:
        if name.lower() in gpu_name.lower():
            return tflops
    return None


def train_gflop_per_image(block_gmac: dict[str, float], head_gmac: float, trainable_blocks: list[str]) -> float:
    """FLOPs (x1e9) of one training step per image, 2 FLOPs per multiply-accumulate.

    Forward through everything, backward (weight and input gradients, ~2x forward) through the
    trainable part only (comms.phase_compute_fraction): the product's trainable part is the top
    of the network, so the frozen blocks below it need no backward at all. The whole network
    trained at 224x224 is ~3 x 31 GFLOP.
    """
    forward = sum(block_gmac.values()) + head_gmac
    return 2 * 3 * forward * phase_compute_fraction(trainable_blocks, block_gmac, head_gmac)


# --------------------------------------------------------------------------------------------
# What the machine has
# --------------------------------------------------------------------------------------------


def nvidia_gpus() -> list[str]:
    """GPU names nvidia-smi lists; none without the driver (no TensorFlow import: fast)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def tensorflow_gpu_count() -> int:
    code = "import tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_worker_env(), timeout=300)
    return int(probe.stdout.split()[-1]) if probe.returncode == 0 and probe.stdout.split() else 0


# --------------------------------------------------------------------------------------------
# One run's worker process
# --------------------------------------------------------------------------------------------


def _worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, Env.LEGACY_KERAS.value: "1", **extra}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _strategy(run: str, cpu: bool, cfg):
    """The strategy as the product builds it for that configuration (the CPU stand-ins aside)."""
    import tensorflow as tf

    if run == "multi_worker_nccl":
        from trainer.cluster import parse_tf_config
        from trainer.strategy import build_distribution

        return build_distribution(parse_tf_config(os.environ[Env.TF_CONFIG.value]), cfg.runtime).strategy
    if run == "mirrored":
        # On GPUs, MirroredStrategy() takes them all (as trainer.strategy does); on CPU, the logical devices.
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")] if cpu else None)
    return tf.distribute.get_strategy()  # xla: one device, the GPU where there is one


def _synthetic(image_size: int, global_batch: int):
    """One random batch, repeated: pixels in [0, 255] and one-hot labels, as the pipeline yields."""
    import tensorflow as tf

    images = tf.random.uniform((global_batch, image_size, image_size, 3), 0, 255, seed=0)
    labels = tf.one_hot(tf.range(global_batch) % CLASSES, CLASSES)
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    options = tf.data.Options()
    # Every worker feeds the same synthetic batch: sharding it would only warn.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def _devices(strategy, run: str) -> list[str]:
    import tensorflow as tf

    if run == "xla":  # the default strategy names no devices: it runs where TensorFlow places ops
        return [(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[0].name]
    return list(strategy.extended.worker_devices)


def _step_times(model, dataset, steps: int) -> list[float]:
    """End time of each training step (Keras syncs its logs to numpy for a batch callback)."""
    import tf_keras as keras

    ends: list[float] = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[record])
    return ends


def measure(run: str, args: argparse.Namespace) -> dict:
    import tensorflow as tf
    import tf_keras as keras

    from trainer.bench.comms import conv_block_gmac
    from trainer.config import config_from_dict
    from trainer.model import base_of, build_model
    from trainer.strategy import sum_over_workers
    from trainer.train.phases import compile_for_phase, plan_phase

    if args.allow_cpu and run == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * CPU_DEVICES)
    keras.mixed_precision.set_global_policy("mixed_float16")
    cfg = config_from_dict({
        "model": {"weights": "none"},
        "data": {"image_size": args.image_size},
        "train": {"batch_size_per_replica": args.batch},
        "runtime": {"mixed_precision": "on", "jit_compile": run == "xla", "all_reduce": "nccl"},
    })  # fmt: skip
    strategy = _strategy(run, args.allow_cpu, cfg)
    global_batch = args.batch * strategy.num_replicas_in_sync
    with strategy.scope():
        model = build_model(CLASSES, args.image_size, cfg.model, seed=0)
    steps = args.warmup + args.steps
    plan = plan_phase(args.phase, cfg, steps_per_epoch=steps, global_batch=global_batch, first_step=0)
    compile_for_phase(model, plan, cfg, strategy)
    ends = _step_times(model, _synthetic(args.image_size, global_batch), steps)
    sum_over_workers(strategy)(tf.constant(0.0))  # a final barrier: no worker leaves while its peer still steps
    head_gmac = sum(layer.kernel.shape.num_elements() for layer in model.layers if hasattr(layer, "kernel")) / 1e9
    return {
        "run": run,
        "replicas": strategy.num_replicas_in_sync,
        "global_batch": global_batch,
        "images_per_second": args.steps * global_batch / (ends[-1] - ends[args.warmup - 1]),
        "train_gflop_per_image": train_gflop_per_image(
            conv_block_gmac(base_of(model)), head_gmac, list(plan.config.unfreeze_blocks)
        ),
        "trainable_blocks": list(plan.config.unfreeze_blocks),
        "devices": _devices(strategy, run),
    }


# --------------------------------------------------------------------------------------------
# The runs, and the table
# --------------------------------------------------------------------------------------------


def _worker_command(run: str, args: argparse.Namespace) -> list[str]:
    settings = ["--image-size", args.image_size, "--batch", args.batch, "--steps", args.steps, "--warmup", args.warmup]
    command = [sys.executable, "-m", "trainer.bench.gpu_check", "--worker", run, "--phase", args.phase]
    return command + [str(s) for s in settings] + (["--allow-cpu"] if args.allow_cpu else [])


def _gpu_groups(run: str, gpus: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each process of a run (None: leave it as it is; "": CPU only)."""
    processes = 2 if run == "multi_worker_nccl" else 1
    if gpus == 0:
        return [""] * processes  # --allow-cpu: on the CPU even where a GPU is present
    if run == "multi_worker_nccl":
        half = gpus // 2  # NCCL cannot put two ranks on one GPU: each worker gets its own GPUs
        return [",".join(map(str, range(half))), ",".join(map(str, range(half, 2 * half)))]
    return [None if run == "mirrored" else "0"]


class Worker(NamedTuple):
    child: Child
    lines: list[str]  # its output (stdout and stderr), read as it comes


def start_run(run: str, args: argparse.Namespace, gpus: int) -> list[Worker]:
    """The run's processes (trainer.supervisor children); each one's output is read as it comes:
    a worker blocked on a full pipe would stall its peer in the next collective."""
    groups = _gpu_groups(run, gpus)
    addresses = [f"localhost:{port}" for port in free_ports(len(groups))] if len(groups) > 1 else []
    processes = []
    for index, visible in enumerate(groups):
        extra = {"CUDA_VISIBLE_DEVICES": visible} if visible is not None else {}
        if addresses:
            extra[Env.TF_CONFIG.value] = make_tf_config(addresses, index)
        lines: list[str] = []
        processes.append(
            Worker(Child(_worker_command(run, args), env=_worker_env(**extra), on_line=lines.append), lines)
        )
    return processes


def finish_run(run: str, workers: list[Worker], timeout: float) -> dict:
    """The first process's (the chief's) result, or why the run failed."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.child.wait(timeout=max(1.0, deadline - time.monotonic()))  # killed past the deadline
        if worker.child.timed_out:
            for other in workers:
                other.child.kill()
                other.child.wait()
            return {"run": run, "error": f"no result within {timeout:.0f} s"}
    for worker in workers:
        worker.child.join_output()
    failed = [(worker.child.returncode, worker.lines) for worker in workers if worker.child.returncode != 0]
    if failed:
        code, lines = failed[0]
        last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
        return {"run": run, "error": f"exit {code}: {last}"}
    results = [line for line in workers[0].lines if line.startswith(RESULT)]
    return json.loads(results[-1].removeprefix(RESULT))


def with_utilisation(result: dict, gpu_name: str | None, peak: float | None) -> dict:
    if "error" in result:
        return result
    per_device = result["images_per_second"] / result["replicas"]
    achieved = per_device * result["train_gflop_per_image"] / 1e3  # TFLOPS per device
    return {
        **result,
        "gpu": gpu_name or "CPU",
        "images_per_second_per_device": per_device,
        "achieved_tflops_per_device": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
    }


def table(results: list[dict]) -> str:
    lines = [
        f"{'run':<18} {'replicas':>8} {'batch':>6} {'img/s':>9} {'img/s/GPU':>10} {'TFLOPS/GPU':>11} {'MFU':>6}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['run']:<18} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
        lines.append(
            f"{r['run']:<18} {r['replicas']:>8} {r['global_batch']:>6} {r['images_per_second']:>9.1f} "
            f"{r['images_per_second_per_device']:>10.1f} {r['achieved_tflops_per_device']:>11.2f} {mfu:>6}"
        )
    return "\n".join(lines)


def _header(args: argparse.Namespace, gpu_names: list[str], peak: float | None, gflop: float | None) -> str:
    where = (
        f"{len(gpu_names)} x {gpu_names[0]}" if gpu_names else f"CPU ({CPU_DEVICES} logical devices; not a measurement)"
    )
    peak_text = f"{peak:.0f} TFLOPS dense fp16 peak" if peak else "peak unknown (--peak-tflops)"
    work = f", {gflop:.1f} GFLOP per image per step" if gflop else ""
    return (f"gpu-check: {where}, {peak_text}; {args.image_size}x{args.image_size}, mixed_float16, phase {args.phase}, "
            f"batch {args.batch}/GPU, {args.steps} steps after {args.warmup} warm-up{work}")  # fmt: skip


def check(args: argparse.Namespace) -> int:
    gpu_names = [] if args.allow_cpu else nvidia_gpus()
    if not gpu_names and not args.allow_cpu:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi lists none); nothing run, nothing written")
        return 0
    gpus = 0 if args.allow_cpu else tensorflow_gpu_count()
    if gpu_names and gpus == 0:
        print(f"gpu-check: error: nvidia-smi lists {len(gpu_names)} GPU(s) but TensorFlow sees none: install "
              "TensorFlow's GPU build (pip install -e '.[gpu]') or run in the image", file=sys.stderr)  # fmt: skip
        return 1
    peak = args.peak_tflops or (peak_tflops(gpu_names[0]) if gpu_names else None)
    results = []
    for run in args.runs:
        if run == "multi_worker_nccl" and 0 < gpus < 2:
            results.append({"run": run, "error": "needs 2 GPUs (NCCL puts one rank on each GPU)"})
            continue
        result = finish_run(run, start_run(run, args, gpus), args.timeout)
        results.append(with_utilisation(result, gpu_names[0] if gpu_names else None, peak))
    gflop = next((r["train_gflop_per_image"] for r in results if "error" not in r), None)
    print(_header(args, gpu_names, peak, gflop))
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpus": gpu_names, "results": results}, fh, indent=2)
    # A run skipped for want of GPUs is not a failure; one that failed is.
    return 1 if any(not r.get("error", "needs").startswith("needs") for r in results) else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first: tracing, XLA compile (default 5)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="images per GPU per step (default 64)")
    parser.add_argument("--phase", choices=("fine_tuning", "feature_extraction"), default="fine_tuning",
                        help="what trains: the phase's unfrozen blocks + the head (default fine_tuning)")  # fmt: skip
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's peak dense fp16 TFLOPS, for a GPU not in the table"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run (default 1800)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU where there is no GPU (tests)")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)  # one run's process (internal)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the timing starts at the end of a warm-up step)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(RESULT + json.dumps(measure(args.worker, args)), flush=True)
        return 0
    return check(args)


if __name__ == "__main__":
    raise SystemExit(main())
