"""trainer.data.prepare.splits: how many images of a class go to validation and test, and which."""

from __future__ import annotations

import random

import pytest

from trainer.data.prepare import split_sizes, stratified_split


@pytest.mark.parametrize(
    ("count", "validation_fraction", "test_fraction", "expected"),
    [
        (1, 0.2, 0.0, (0, 0)),  # a single image stays in train
        (2, 0.2, 0.0, (1, 0)),  # >= 2 images: validation gets at least one
        (2, 0.2, 0.2, (1, 0)),  # test needs >= 3
        (3, 0.2, 0.2, (1, 1)),
        (10, 0.2, 0.1, (2, 1)),
        (10, 0.0, 0.0, (0, 0)),
        (4, 0.9, 0.0, (3, 0)),  # at least one image always stays in train
        (3, 0.0, 0.5, (0, 2)),
    ],
)
def test_split_sizes(count, validation_fraction, test_fraction, expected):
    assert split_sizes(count, validation_fraction, test_fraction) == expected


def test_stratified_split_is_deterministic_and_ignores_listing_order():
    items = {"cat": [f"cat/{i}.jpg" for i in range(30)], "dog": [f"dog/{i}.jpg" for i in range(12)]}
    shuffled = {name: random.Random(1).sample(paths, len(paths)) for name, paths in items.items()}

    first = stratified_split(items, 0.2, 0.1, seed=5)
    assert stratified_split(shuffled, 0.2, 0.1, seed=5) == first
    assert stratified_split(items, 0.2, 0.1, seed=6) != first


def test_stratified_split_keeps_class_proportions_and_loses_nothing():
    items = {"cat": [f"cat/{i}" for i in range(50)], "dog": [f"dog/{i}" for i in range(10)]}

    split = stratified_split(items, 0.2, 0.1, seed=0)

    assert {name: len(paths) for name, paths in split["validation"].items()} == {"cat": 10, "dog": 2}
    assert {name: len(paths) for name, paths in split["test"].items()} == {"cat": 5, "dog": 1}
    for name, paths in items.items():
        regrouped = [p for s in ("train", "validation", "test") for p in split[s][name]]
        assert sorted(regrouped) == sorted(paths)


def test_adding_a_class_does_not_change_the_split_of_the_others():
    cats = {"cat": [f"cat/{i}" for i in range(20)]}
    alone = stratified_split(cats, 0.25, 0.0, seed=3)
    with_dogs = stratified_split({**cats, "dog": [f"dog/{i}" for i in range(20)]}, 0.25, 0.0, seed=3)
    assert with_dogs["validation"]["cat"] == alone["validation"]["cat"]
