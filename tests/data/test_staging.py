"""Local staging of a worker's gs:// shards (real GCS emulator over HTTP)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer import gcs as gcs_lib
from trainer.data.staging import DISK_SHARE, ShardStager, budget_bytes, plan_staging
from trainer.errors import DataError


@pytest.mark.parametrize(
    ("sizes", "budget", "expected"),
    [
        ([10, 10, 10], 30, [True, True, True]),
        ([10, 10, 10], 25, [True, True, False]),
        ([30, 5, 5], 20, [False, True, True]),  # a big shard stays remote; smaller ones still fit
        ([10], 0, [False]),  # budget 0: staging off in effect
    ],
)
def test_plan_staging_fills_the_budget_in_order(sizes, budget, expected):
    assert plan_staging(sizes, budget) == expected


def test_the_budget_follows_the_disk_unless_set(tmp_path):
    free = shutil.disk_usage(tmp_path).free

    assert budget_bytes(2.5, str(tmp_path)) == 2_500_000_000
    assert abs(budget_bytes(0, str(tmp_path / "shards")) - free * DISK_SHARE) < 0.01 * free  # the default


@pytest.fixture
def shards(gcs, gcs_bucket, monkeypatch) -> list[tuple[str, bytes]]:
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    gcs_lib.client.cache_clear()
    contents = [bytes([i]) * (1000 + i) for i in range(3)]
    for i, data in enumerate(contents):
        gcs.put_object(gcs_bucket, f"data/train-0000{i}-of-00003.tfrecord", data)
    yield [(f"gs://{gcs_bucket}/data/train-0000{i}-of-00003.tfrecord", data) for i, data in enumerate(contents)]
    gcs_lib.client.cache_clear()


def test_stager_copies_the_shards_that_fit_and_points_reads_at_them(shards, tmp_path):
    uris = [uri for uri, _ in shards]
    stager = ShardStager(uris, [len(d) for _, d in shards], str(tmp_path), budget_bytes=2100, workers=2)
    try:
        stager.wait()
        paths = list(stager.paths())
    finally:
        stager.close()

    assert paths == [str(tmp_path / uris[0].rsplit("/", 1)[1]), str(tmp_path / uris[1].rsplit("/", 1)[1]), uris[2]]
    assert [Path(p).read_bytes() for p in paths[:2]] == [shards[0][1], shards[1][1]]
    assert stager.staged == 2


def test_a_copy_that_disagrees_with_the_manifest_is_refused(shards, tmp_path):
    uri, data = shards[0]
    stager = ShardStager([uri], [len(data) + 1], str(tmp_path), budget_bytes=10_000, workers=1)
    try:
        with pytest.raises(DataError, match="the manifest says"):
            stager.wait()
        assert list(stager.paths()) == [uri]  # still read remotely
    finally:
        stager.close()
