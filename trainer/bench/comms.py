"""Communication volume per training step, and the scaling it implies.

Measured (counted from the real Keras models): the gradient bytes each worker all-reduces
per step in every phase, i.e. the trainable variables' sizes (float32 gradients, also under
mixed precision, whose variables stay float32), and each conv block's forward cost.

Computed (a simple model, not a measurement): scaling efficiency at n workers of one GPU
each, ring all-reduce over one link per worker:

    t_comm    = 2 (n - 1) / n * bytes / link_bandwidth
    t_compute = per_gpu_batch / gpu_images_per_s * (forward + backward of the phase) / (3 * forward)

where a full training step costs 3x the forward pass (backward ~ 2x forward) and a phase
runs backward only through its trainable blocks. Efficiency lies between t_c / (t_c + t_comm)
(no overlap of communication with compute) and t_c / max(t_c, t_comm) (perfect overlap).
"""

from __future__ import annotations

from trainer.config import VGG16_BLOCKS

IMAGE_SIZE = 224
CLASSES = 10  # a transfer-learning head; the dense head is small either way
PER_GPU_BATCH = 64
WORKERS = (2, 4, 8)
LINKS_GBPS = (25, 100)
PHASES = {
    "frozen base": [],
    "block5": ["block5"],
    "blocks 4-5": ["block4", "block5"],
    "whole network": list(VGG16_BLOCKS),
}
#: Published VGG16 training throughput per GPU (images/s), tf_cnn_benchmarks as run by Lambda Labs.
GPU_IMAGES_PER_SECOND = {"V100 fp32": 249.0, "V100 fp16": 456.0, "A100 fp16": 1190.0}
HOROVOD = {
    "source": "Sergeev & Del Balso, Horovod (arXiv:1802.05799), Pascal GPUs, 25 Gbit/s RoCE",
    "gpus": 512,
    "vgg16_scaling_efficiency": 0.68,
    "resnet101_scaling_efficiency": 0.90,
}


def measure(args: dict) -> dict:
    import tf_keras as keras

    from trainer.config import ModelConfig
    from trainer.model import base_of, build_model, set_trainable_blocks

    product = build_model(CLASSES, IMAGE_SIZE, ModelConfig(weights="none"))
    block_gmac = conv_block_gmac(base_of(product))
    volumes = {name: gradient_bytes(product, blocks, set_trainable_blocks) for name, blocks in PHASES.items()}
    classic = keras.applications.VGG16(weights=None, include_top=True)
    classic_bytes = 4 * int(sum(keras.backend.count_params(w) for w in classic.trainable_weights))
    head_gmac = dense_gmac(classic)
    return {
        "image_size": IMAGE_SIZE,
        "classes": CLASSES,
        "block_forward_gmac": block_gmac,
        "product_model": {"total_params": int(product.count_params()), "bytes_per_step": volumes},
        "vgg16_imagenet_top": {"total_params": int(classic.count_params()), "bytes_per_step": classic_bytes},
        "scaling": scaling_rows(volumes, block_gmac, classic_bytes, head_gmac),
        "assumptions": {
            "per_gpu_batch": PER_GPU_BATCH,
            "gpu_images_per_second": GPU_IMAGES_PER_SECOND,
            "gpu_source": "tf_cnn_benchmarks VGG16 training throughput as published by Lambda Labs (NOTES.md)",
            "workers_gpus": 1,
        },
        "horovod_published": HOROVOD,
        "horovod_model": horovod_comparison(classic_bytes, block_gmac, head_gmac),
    }


def gradient_bytes(model, blocks: list[str], set_trainable_blocks) -> int:
    set_trainable_blocks(model, blocks)
    return 4 * int(sum(w.shape.num_elements() for w in model.trainable_weights))


def conv_block_gmac(base) -> dict[str, float]:
    """Forward multiply-accumulates per image of each VGG16 conv block, from the layers' shapes."""
    totals = dict.fromkeys(VGG16_BLOCKS, 0.0)
    for layer in base.layers:
        if not layer.name.endswith(tuple(f"conv{i}" for i in range(1, 4))):
            continue
        _, height, width, channels_out = layer.output_shape
        kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
        totals[layer.name.split("_")[0]] += height * width * kernel_h * kernel_w * channels_in * channels_out / 1e9
    return {block: round(gmac, 3) for block, gmac in totals.items()}


def dense_gmac(model) -> float:
    """Forward GMAC per image of the classic VGG16 top (fc1, fc2, predictions)."""
    dense = [layer for layer in model.layers if layer.name.startswith(("fc", "pred"))]
    return sum(layer.kernel.shape.num_elements() for layer in dense) / 1e9


def phase_compute_fraction(blocks: list[str], block_gmac: dict[str, float], head_gmac: float = 0.0) -> float:
    """A phase's step cost relative to a full training step (forward + 2x backward of everything)."""
    forward = sum(block_gmac.values()) + head_gmac
    backward = 2 * (sum(block_gmac[b] for b in blocks) + head_gmac)
    return (forward + backward) / (3 * forward)


def efficiency(compute_s: float, comm_s: float) -> dict[str, float]:
    return {
        "efficiency_no_overlap": round(compute_s / (compute_s + comm_s), 3),
        "efficiency_full_overlap": round(min(1.0, compute_s / comm_s) if comm_s else 1.0, 3),
    }


def ring_seconds(nbytes: int, workers: int, link_gbps: float) -> float:
    return 2 * (workers - 1) / workers * nbytes / (link_gbps * 1e9 / 8)


def scaling_rows(volumes: dict[str, int], block_gmac: dict[str, float], classic_bytes: int, head_gmac: float):
    rows = []
    models = [("product model", name, PHASES[name], nbytes, 0.0) for name, nbytes in volumes.items()]
    models.append(("VGG16 + ImageNet top", "whole network", list(VGG16_BLOCKS), classic_bytes, head_gmac))
    for model, phase, blocks, nbytes, head in models:
        for gpu, images_per_second in GPU_IMAGES_PER_SECOND.items():
            compute = PER_GPU_BATCH / images_per_second * phase_compute_fraction(blocks, block_gmac, head)
            for workers in WORKERS:
                for link in LINKS_GBPS:
                    comm = ring_seconds(nbytes, workers, link)
                    rows.append(
                        {
                            "model": model,
                            "phase": phase,
                            "gpu": gpu,
                            "workers": workers,
                            "link_gbps": link,
                            "mb_per_step": round(nbytes / 1e6, 2),
                            "compute_s": round(compute, 4),
                            "comm_s": round(comm, 4),
                            **efficiency(compute, comm),
                        }
                    )
    return rows


def horovod_comparison(classic_bytes: int, block_gmac: dict[str, float], head_gmac: float) -> dict:
    """The model's prediction for the paper's setting (VGG16 with its top, 512 GPUs, 25 Gbit/s)."""
    workers = HOROVOD["gpus"]
    compute = (
        PER_GPU_BATCH
        / GPU_IMAGES_PER_SECOND["V100 fp32"]
        * phase_compute_fraction(list(VGG16_BLOCKS), block_gmac, head_gmac)
    )
    comm = ring_seconds(classic_bytes, workers, 25)
    return {"workers": workers, "link_gbps": 25, "gpu": "V100 fp32", "compute_s": round(compute, 4),
            "comm_s": round(comm, 4), **efficiency(compute, comm)}  # fmt: skip
