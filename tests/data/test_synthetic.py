"""The built-in demo dataset: deterministic JPEG files of clearly different classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.data.synthetic import CLASSES, make_demo_images
from trainer.errors import ConfigError


def test_writes_per_class_jpegs_in_the_flow_from_directory_layout(tmp_path):
    names = make_demo_images(str(tmp_path), classes=3, per_class=5, size=48)

    assert names == ["red_circles", "green_stripes", "blue_squares"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for name in names:
        files = sorted((tmp_path / name).iterdir())
        assert [f.name for f in files] == [f"{i}.jpg" for i in range(5)]
        with Image.open(files[0]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    make_demo_images(str(tmp_path / "a"), classes=2, per_class=3, seed=1)
    make_demo_images(str(tmp_path / "b"), classes=2, per_class=3, seed=1)
    make_demo_images(str(tmp_path / "c"), classes=2, per_class=3, seed=2)

    same = tmp_path / "a" / "red_circles" / "2.jpg"
    assert same.read_bytes() == (tmp_path / "b" / "red_circles" / "2.jpg").read_bytes()
    assert same.read_bytes() != (tmp_path / "c" / "red_circles" / "2.jpg").read_bytes()


def test_more_images_keep_the_existing_ones(tmp_path):
    make_demo_images(str(tmp_path / "few"), classes=2, per_class=2)
    make_demo_images(str(tmp_path / "many"), classes=3, per_class=4)

    for name in ("red_circles", "green_stripes"):
        for i in range(2):
            assert (tmp_path / "few" / name / f"{i}.jpg").read_bytes() == (
                tmp_path / "many" / name / f"{i}.jpg"
            ).read_bytes()


def _mean_colour(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_classes_differ_clearly_even_in_mean_colour(tmp_path):
    """A nearest-mean-colour rule already separates the held-out images: a CNN has it easy."""
    names = make_demo_images(str(tmp_path), classes=len(CLASSES), per_class=12, size=32)
    colours = {n: [_mean_colour(tmp_path / n / f"{i}.jpg") for i in range(12)] for n in names}
    centroids = {n: np.mean(c[:8], axis=0) for n, c in colours.items()}

    def nearest(colour: np.ndarray) -> str:
        return min(centroids, key=lambda n: float(np.linalg.norm(colour - centroids[n])))

    held_out = [(n, c) for n, cs in colours.items() for c in cs[8:]]
    accuracy = np.mean([nearest(c) == n for n, c in held_out])
    assert accuracy >= 0.9


def test_images_vary_within_a_class(tmp_path):
    make_demo_images(str(tmp_path), classes=2, per_class=6, size=32)
    pixels = []
    for i in range(6):
        with Image.open(tmp_path / "green_stripes" / f"{i}.jpg") as image:
            pixels.append(np.asarray(image, dtype=np.float64))
    assert min(np.abs(a - b).mean() for i, a in enumerate(pixels) for b in pixels[i + 1 :]) > 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "classes must be between 2 and"),
        ({"classes": len(CLASSES) + 1}, "classes must be between 2 and"),
        ({"per_class": 0}, "per_class must be at least 1"),
        ({"size": 8}, "size must be at least"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_demo_images(str(tmp_path), **kwargs)
