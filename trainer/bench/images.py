"""A realistic JPEG set for the benchmark, generated locally (no downloads).

Photos from a camera or the web, as users feed the product, are about 500x375 pixels and
60-110 KB as JPEG (ImageNet's average). What makes a JPEG slow or fast to decode is its
size in pixels and its entropy-coded bytes, so the generated images match both: varied
sizes around 500x375 (a fifth of them portrait) whose content mixes smooth colour fields,
mid-frequency texture and fine noise, with the noise level tuned per image until the
file lands in the target byte range. Images depend only on (seed, class, index).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_QUALITY = 90
TARGET_KB = (60.0, 110.0)
_ATTEMPTS = 6


@dataclass(frozen=True)
class ImageSet:
    root: str  # root/<class>/<i>.jpg, the layout flow_from_directory and `trainer prepare` read
    classes: list[str]
    paths: list[str]

    def sizes_kb(self) -> list[float]:
        return [os.path.getsize(p) / 1000 for p in self.paths]


def make_image_set(root: str, classes: int, per_class: int, seed: int = 0) -> ImageSet:
    names = [f"class_{i}" for i in range(classes)]
    paths = []
    for class_index, name in enumerate(names):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            path = os.path.join(root, name, f"{i:04d}.jpg")
            with open(path, "wb") as fh:
                fh.write(realistic_jpeg(np.random.default_rng([seed, class_index, i])))
            paths.append(path)
    return ImageSet(root, names, paths)


def realistic_jpeg(rng: np.random.Generator) -> bytes:
    """One JPEG of about 500x375 pixels whose size falls in TARGET_KB."""
    width, height = int(rng.integers(420, 581)), int(rng.integers(300, 451))
    if rng.random() < 0.2:
        width, height = height, width
    smooth, texture, noise = _layers(rng, width, height)
    target = rng.uniform(*TARGET_KB)
    sigma = 7.0
    for _ in range(_ATTEMPTS):
        encoded = _encode(smooth + texture + noise * sigma)
        kb = len(encoded) / 1000
        if TARGET_KB[0] <= kb <= TARGET_KB[1]:
            break
        # File size grows roughly linearly with the noise level in this range.
        sigma = max(0.5, sigma * target / kb)
    return encoded


def _layers(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, ...]:
    coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    mid = np.clip(rng.normal(128, 40, (height // 4 + 1, width // 4 + 1, 3)), 0, 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(mid).resize((width, height), Image.BILINEAR), np.float32) - 128
    noise = rng.normal(0, 1, (height, width, 3)).astype(np.float32)
    return smooth, texture, noise


def _encode(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()
