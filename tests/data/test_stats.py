"""Image stats `prepare` stores for the plan: sizes, and whether mirroring changes what images show."""

from __future__ import annotations

import numpy as np
from PIL import Image

from trainer.data.stats import THUMBNAIL_SIDE, ImageStats, image_stats, suggested_image_size, thumbnail


def _glyph(kind: int, rng) -> Image.Image:
    """An asymmetric stroke: class 0 leans one way, class 1 the other (a mirror turns one into the other)."""
    canvas = np.full((32, 32), 255, np.uint8)
    for row in range(4, 28):
        col = 4 + row // 2 + int(rng.integers(-1, 2))
        col = col if kind == 0 else 31 - col
        canvas[row, col : col + 3] = 0
    return Image.fromarray(canvas).convert("RGB")


def _blob(kind: int, rng) -> Image.Image:
    """A symmetric subject: class 0 dark, class 1 light, facing either way."""
    canvas = np.full((32, 32), 128, np.uint8)
    canvas[8:24, 8:24] = 40 if kind == 0 else 220
    canvas += rng.integers(0, 20, canvas.shape, dtype=np.uint8)
    return Image.fromarray(canvas).convert("RGB")


def _stats(draw) -> ImageStats:
    rng = np.random.default_rng(0)
    thumbnails = {label: [thumbnail(draw(label, rng)) for _ in range(30)] for label in (0, 1)}
    return image_stats([(32, 32)] * 60, thumbnails, num_classes=2)


def test_classes_a_mirror_turns_into_each_other_are_mirror_dependent():
    stats = _stats(_glyph)

    assert stats.nearest_mean_accuracy > 0.9
    assert stats.mirrored_accuracy < 0.1
    assert stats.mirror_dependent


def test_symmetric_subjects_are_not():
    stats = _stats(_blob)

    assert stats.mirror_cost < 0.1
    assert not stats.mirror_dependent


def test_stats_round_trip_through_the_manifest_and_old_manifests_have_none():
    stats = _stats(_glyph)

    assert ImageStats.from_manifest_extra({"image_stats": stats.to_dict()}) == stats
    assert ImageStats.from_manifest_extra({}) is None


def test_thumbnail_is_grey_and_small():
    assert len(thumbnail(Image.new("RGB", (500, 375), (10, 200, 30)))) == THUMBNAIL_SIDE**2


def test_suggested_image_size_follows_the_images_in_multiples_of_32():
    assert [suggested_image_size(side) for side in (8, 32, 50, 100, 375, 4000)] == [32, 32, 64, 96, 224, 224]


def test_prepare_stores_the_stats_in_the_manifest_and_says_what_they_call_for(tmp_path):
    from trainer.config import PrepareConfig
    from trainer.data.manifest import read_manifest
    from trainer.data.prepare import prepare_dataset

    rng = np.random.default_rng(1)
    for label, name in enumerate(("leans-left", "leans-right")):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(10):
            _glyph(label, rng).save(tmp_path / "src" / name / f"{i}.png")

    report = prepare_dataset(
        str(tmp_path / "src"), str(tmp_path / "data"), PrepareConfig(min_shards=1, processes=1), progress=lambda _: None
    )

    stats = ImageStats.from_manifest_extra(read_manifest(str(tmp_path / "data")).extra)
    assert stats is not None and stats.mirror_dependent and stats.images == 16  # 80% of 20 in train
    assert (stats.median_width, stats.median_height) == (32, 32)
    said = "\n".join(report.summary_lines())
    assert "training leaves flips off" in said and "--set data.image_size=32" in said
