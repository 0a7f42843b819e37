"""The built-in demo dataset: small JPEGs of coloured shapes and patterns, made locally.

Each class pairs a dominant colour with a shape or pattern ("red_circles",
"green_stripes", ...), so a small VGG16 separates them well even from random weights,
and random crops or flips never remove what defines a class: shapes are repeated across
the image (one per quadrant) and patterns fill it. Positions, sizes, background, noise and brightness vary
per image so the task is not trivial.

Images depend only on (seed, class, index): the same call always writes the same files.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from trainer.errors import ConfigError

JPEG_QUALITY = 90
_MIN_SIZE = 16
_BACKGROUND_TINT = 0.4

Colour = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, int, Colour, np.random.Generator], None]


def _spread(size: int, rng: np.random.Generator) -> np.ndarray:
    """Shape centres: one per quadrant plus up to two anywhere, so every large crop keeps a shape."""
    half = size / 2
    quadrants = [
        (qx + rng.uniform(0.15, 0.85) * half, qy + rng.uniform(0.15, 0.85) * half)
        for qx in (0, half)
        for qy in (0, half)
    ]
    extra = [tuple(rng.uniform(0, size, 2)) for _ in range(rng.integers(0, 3))]
    return np.array(quadrants + extra)


def _circles(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    for x, y in _spread(size, rng):
        r = size * rng.uniform(0.1, 0.18)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _squares(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    for x, y in _spread(size, rng):
        half = size * rng.uniform(0.09, 0.16)
        draw.rectangle((x - half, y - half, x + half, y + half), fill=colour)


def _triangles(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    for x, y in _spread(size, rng):
        r = size * rng.uniform(0.12, 0.2)
        draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=colour)


def _crosses(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    for x, y in _spread(size, rng):
        r = size * rng.uniform(0.1, 0.18)
        w = max(1.5, r * 0.35)
        draw.rectangle((x - r, y - w, x + r, y + w), fill=colour)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=colour)


def _stripes(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    # Periods stay >= 1/8 of the side so the bars survive downscaling to a 32x32 input.
    period = size * rng.uniform(0.125, 0.25)
    y = -rng.uniform(0, period)
    while y < size:
        draw.rectangle((0, y, size, y + period / 2), fill=colour)
        y += period


def _checkers(draw: ImageDraw.ImageDraw, size: int, colour: Colour, rng: np.random.Generator) -> None:
    cell = size * rng.uniform(0.1, 0.2)
    dx, dy = rng.uniform(0, cell, 2)
    cells = int(size / cell) + 2
    for row in range(cells):
        for col in range(row % 2, cells, 2):
            x, y = col * cell - dx, row * cell - dy
            draw.rectangle((x, y, x + cell, y + cell), fill=colour)


#: Class name -> (dominant colour, painter). The first ``classes`` entries are used.
CLASSES: dict[str, tuple[Colour, Painter]] = {
    "red_circles": ((220, 40, 40), _circles),
    "green_stripes": ((40, 190, 60), _stripes),
    "blue_squares": ((40, 70, 220), _squares),
    "yellow_checkers": ((230, 210, 40), _checkers),
    "magenta_triangles": ((210, 50, 200), _triangles),
    "cyan_crosses": ((40, 200, 210), _crosses),
}


def make_demo_images(dest: str, classes: int = 4, per_class: int = 60, size: int = 64, seed: int = 0) -> list[str]:
    """Write ``dest/<class>/<i>.jpg`` for the first ``classes`` demo classes; returns their names."""
    if not 2 <= classes <= len(CLASSES):
        raise ConfigError(f"demo dataset: classes must be between 2 and {len(CLASSES)}, got {classes}")
    if per_class < 1:
        raise ConfigError(f"demo dataset: per_class must be at least 1, got {per_class}")
    if size < _MIN_SIZE:
        raise ConfigError(f"demo dataset: size must be at least {_MIN_SIZE} pixels, got {size}")
    names = list(CLASSES)[:classes]
    for class_index, name in enumerate(names):
        class_dir = os.path.join(dest, name)
        os.makedirs(class_dir, exist_ok=True)
        for i in range(per_class):
            # One generator per image: adding classes or images never changes the existing ones.
            rng = np.random.default_rng([seed, class_index, i])
            demo_image(name, size, rng).save(os.path.join(class_dir, f"{i}.jpg"), "JPEG", quality=JPEG_QUALITY)
    return names


def demo_image(class_name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of ``class_name``: a noisy, tinted background, the class pattern, jitter."""
    colour, paint = CLASSES[class_name]
    grey = rng.uniform(60, 140) + rng.normal(0, 8, 3)  # random brightness and a faint random tint
    # A trace of the class colour in the background makes colour a whole-image cue: even the
    # features of a randomly initialised, frozen VGG16 then separate the classes quickly.
    background = np.clip((1 - _BACKGROUND_TINT) * grey + _BACKGROUND_TINT * np.array(colour), 0, 255)
    image = Image.fromarray(np.full((size, size, 3), background, dtype=np.uint8))
    paint(ImageDraw.Draw(image), size, _jitter_colour(colour, rng), rng)
    pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.75, 1.2)  # brightness
    pixels += rng.normal(0, 10, pixels.shape)  # sensor-like noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jitter_colour(colour: Colour, rng: np.random.Generator) -> Colour:
    r, g, b = (int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    return r, g, b
