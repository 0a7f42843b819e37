"""trainer.data.prepare.shards: how many shards a split gets, and which images each holds."""

from __future__ import annotations

import pytest

from trainer.data.prepare import assign_to_shards, shard_count


@pytest.mark.parametrize(
    ("total_bytes", "images", "shard_size_mb", "min_shards", "expected"),
    [
        (0, 0, 128.0, 16, 0),  # an empty split has no shards
        (10_000, 5, 128.0, 16, 5),  # min_shards is capped by the image count
        (10_000, 100, 128.0, 16, 16),  # small split: min_shards
        (1_000_000_000, 10_000, 128.0, 2, 8),  # large split: ceil(1000 MB / 128 MB)
        (1_000_000_000, 3, 128.0, 1, 3),  # never more shards than images
        (10, 1, 128.0, 1, 1),
    ],
)
def test_shard_count(total_bytes, images, shard_size_mb, min_shards, expected):
    assert shard_count(total_bytes, images, shard_size_mb, min_shards) == expected


def test_assign_to_shards_is_a_balanced_seeded_permutation():
    shards = assign_to_shards(103, 10, seed="s")

    assert sorted(i for shard in shards for i in shard) == list(range(103))
    assert {len(shard) for shard in shards} == {10, 11}
    assert assign_to_shards(103, 10, seed="s") == shards
    assert assign_to_shards(103, 10, seed="t") != shards
    # Shuffled, not cut in listing order, so shards mix the (path-sorted) classes.
    assert shards[0] != list(range(11))
