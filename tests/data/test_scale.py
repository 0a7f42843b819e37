"""The scale `trainer prepare` stores images at, and training's refusal to read them larger."""

from __future__ import annotations

import pytest

from trainer.data import scale
from trainer.errors import ConfigError


@pytest.mark.parametrize(
    ("image_size", "side"),
    [(224, 256), (32, 37), (299, 342), (0, 0)],
)
def test_the_stored_shorter_side_is_eight_sevenths_of_the_model_input(image_size, side):
    assert scale.stored_side(image_size) == side


@pytest.mark.parametrize(
    ("width", "height", "side", "stored"),
    [
        (600, 400, 256, (384, 256)),  # landscape: the height becomes the side
        (300, 900, 256, (256, 768)),  # portrait
        (256, 300, 256, None),  # already at the side: stored as it is
        (40, 40, 256, None),  # smaller: never scaled up
        (4000, 3000, 0, None),  # 0: nothing is scaled
    ],
)
def test_only_images_larger_than_the_side_are_scaled_keeping_their_aspect(width, height, side, stored):
    assert scale.stored_size(width, height, side) == stored


def test_a_run_reading_downscaled_images_at_a_larger_input_is_refused_with_the_fix():
    extra = {scale.PREPARED_FOR: 224, scale.DOWNSCALED: 12}
    scale.check_image_size(extra, 224)
    scale.check_image_size(extra, 160)
    with pytest.raises(ConfigError) as raised:
        scale.check_image_size(extra, 299)
    message = str(raised.value)
    assert "\n" not in message
    assert "data.image_size=299" in message and "--set prepare.image_size=299" in message


def test_datasets_with_nothing_downscaled_or_from_before_the_option_train_at_any_size():
    scale.check_image_size({scale.PREPARED_FOR: 224, scale.DOWNSCALED: 0}, 512)
    scale.check_image_size({}, 512)
