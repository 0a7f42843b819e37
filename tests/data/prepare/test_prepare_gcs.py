"""`trainer prepare` straight to gs:// (a real GCS emulator over HTTP): parallel, resumable uploads."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest
import tensorflow as tf

from trainer.data import records
from trainer.data.synthetic import make_demo_images
from trainer.launch import entrypoint_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("gcs-images")
    make_demo_images(str(root), classes=3, per_class=16, size=40, seed=2)
    return str(root)


def _prepare(images: str, dataset: str, env: dict, *extra: str) -> subprocess.Popen:
    args = ["prepare", images, dataset, "--set", "prepare.min_shards=6", "--set", "prepare.processes=1", *extra]
    return subprocess.Popen(
        entrypoint_command() + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _objects(gcs, bucket: str, prefix: str) -> dict[str, int]:
    return {blob.name.removeprefix(prefix): blob.size for blob in gcs.client().list_blobs(bucket, prefix=prefix)}


def _shard_names(objects: dict[str, int]) -> list[str]:
    return sorted(name for name in objects if name.endswith(records.SHARD_SUFFIX))


def test_prepare_to_gcs_writes_shards_then_the_manifest(images, gcs_bucket, gcs, gcs_env):
    dataset = f"gs://{gcs_bucket}/flowers"

    cli = _prepare(images, dataset, gcs_env)
    out, _ = cli.communicate(timeout=120)

    assert cli.returncode == 0, out[-3000:]
    objects = _objects(gcs, gcs_bucket, "flowers/")
    manifest = json.loads(gcs.client().bucket(gcs_bucket).blob("flowers/manifest.json").download_as_bytes())
    listed = {s["path"]: s["bytes"] for split in manifest["shards"].values() for s in split}
    assert len(listed) == 12  # 6 training + 6 validation (prepare.min_shards=6)
    assert {name: objects[name] for name in _shard_names(objects)} == listed
    times = {b.name: b.time_created for b in gcs.client().list_blobs(gcs_bucket, prefix="flowers/")}
    assert times["flowers/manifest.json"] >= max(times.values())  # written last


def test_prepare_killed_halfway_is_completed_by_a_rerun(images, gcs_bucket, gcs, gcs_env, tmp_path):
    dataset = f"gs://{gcs_bucket}/flowers"
    gcs.delay_next(1000, seconds=0.5, methods=["POST"], path_contains="uploadType")  # slow uploads
    first = _prepare(images, dataset, gcs_env, "--set", "storage.upload_workers=1")
    deadline = time.monotonic() + 120
    while len(_shard_names(_objects(gcs, gcs_bucket, "flowers/"))) < 3:
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    gcs.reset()
    half = _objects(gcs, gcs_bucket, "flowers/")
    assert "manifest.json" not in half  # a half-finished dataset never looks complete

    out, _ = _prepare(images, dataset, gcs_env).communicate(timeout=120)

    uploaded, intact = map(int, re.search(r"uploaded (\d+) shard\(s\) .*, (\d+) already there intact", out).groups())
    assert intact >= len(_shard_names(half)) >= 3 and uploaded + intact == 12, out
    objects = _objects(gcs, gcs_bucket, "flowers/")
    manifest = json.loads(gcs.client().bucket(gcs_bucket).blob("flowers/manifest.json").download_as_bytes())
    listed = sorted(s["path"] for split in manifest["shards"].values() for s in split)
    assert _shard_names(objects) == listed  # no duplicates, nothing stale
    for split, shards in manifest["shards"].items():
        for shard in shards:
            local = tmp_path / shard["path"]
            gcs.client().bucket(gcs_bucket).blob(f"flowers/{shard['path']}").download_to_filename(local)
            assert sum(1 for _ in tf.data.TFRecordDataset(str(local))) == shard["records"], split
