"""The scale `trainer prepare` stores images at, and the check that training does not read them larger.

Decoding a JPEG costs in proportion to its pixels, and a worker decodes every training image
every epoch, so `prepare` stores each image with its shorter side at most
``stored_side(prepare.image_size)``: 256 px for the default 224 px model input. That is the
ImageNet convention (resize to 256, crop 224): the evaluation centre crop
(``data.center_crop_fraction`` 0.875) of a 256 px side is exactly 224 px, and a random crop
keeps at least 59% of the side (``crop_area_min`` 0.35), about 150 px, upscaled by at most 1.5x.
Images already that small are stored as they are; nothing is ever scaled up.

A run at a model input above the size the images were stored for would upscale every image,
which is never what a user wants, so it is refused with the fix (:func:`check_image_size`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trainer.errors import ConfigError

#: Stored shorter side per model input pixel (256 / 224).
SIDE_PER_INPUT_PIXEL = 256 / 224

#: Keys of the manifest's ``extra`` that record the scale (written by prepare).
PREPARED_FOR = "prepared_for_image_size"
DOWNSCALED = "downscaled_images"


def stored_side(image_size: int) -> int:
    """The shorter side images are stored at for a model input of ``image_size`` (0: unscaled)."""
    return math.ceil(image_size * SIDE_PER_INPUT_PIXEL - 1e-9) if image_size > 0 else 0


def stored_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """(width, height) to store an image at so its shorter side is ``side``; None: store it as it is."""
    shorter = min(width, height)
    if side <= 0 or shorter <= side:
        return None
    if width <= height:
        return side, max(side, round(height * side / width))
    return max(side, round(width * side / height)), side


def check_image_size(extra: Mapping[str, Any], image_size: int) -> None:
    """Refuse a model input larger than the one the dataset's downscaled images were stored for."""
    prepared_for, downscaled = int(extra.get(PREPARED_FOR) or 0), int(extra.get(DOWNSCALED) or 0)
    if prepared_for and downscaled and image_size > prepared_for:
        raise ConfigError(
            f"data.image_size={image_size}, but the dataset was prepared for {prepared_for} px "
            f"({downscaled} image(s) stored with a shorter side of {stored_side(prepared_for)} px) and training would "
            f"upscale them; re-run `trainer prepare` with --set prepare.image_size={image_size} (or 0 to store the "
            f"originals), or train at data.image_size <= {prepared_for}"
        )
