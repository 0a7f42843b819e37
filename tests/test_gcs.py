"""trainer.gcs against a real GCS emulator over HTTP, with injected faults."""

from __future__ import annotations

import pytest

from tests.support.gcs import TEST_TOKEN
from trainer import gcs as gcs_lib
from trainer import storage
from trainer.errors import ConfigError, DataError, TransientError


@pytest.fixture
def bucket(gcs_bucket, gcs, monkeypatch) -> str:
    """A fresh bucket, and this process's google-cloud-storage client pointed at the emulator."""
    for key, value in gcs.env().items():
        monkeypatch.setenv(key, value)
    gcs_module_reset()
    yield gcs_bucket
    gcs_module_reset()


def gcs_module_reset() -> None:
    gcs_lib.client.cache_clear()
    gcs_lib.set_retry_budget(gcs_lib.DEFAULT_RETRY_BUDGET_SECONDS)


def test_parse_uris():
    assert gcs_lib.GcsPath.parse("gs://bucket/a/b.txt") == gcs_lib.GcsPath("bucket", "a/b.txt")
    assert str(gcs_lib.GcsPath.parse("gs://bucket/prefix/")) == "gs://bucket/prefix/"  # a "dir/" marker object
    for bad in ("bucket/a", "gs://", "s3://bucket/a"):
        with pytest.raises(ConfigError, match="is not a gs://bucket/path URI"):
            gcs_lib.GcsPath.parse(bad)


def test_objects_round_trip_through_storage(bucket):
    uri = f"gs://{bucket}/run/summary.json"

    storage.write_text(uri, '{"ok": true}')

    assert storage.read_text(uri) == '{"ok": true}'
    assert storage.exists(uri) and storage.exists(f"gs://{bucket}/run")  # an object and a "directory"
    assert storage.glob(f"gs://{bucket}/run/*.json") == [uri]
    assert storage.size(uri) == len('{"ok": true}')
    storage.remove_tree(f"gs://{bucket}/run")
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read_text(uri)


def test_transient_errors_are_retried(bucket, gcs):
    uri = f"gs://{bucket}/manifest.json"
    storage.write_text(uri, "{}")
    gcs.fail_next(2, status=503, path_contains="manifest.json")

    assert storage.read_text(uri) == "{}"

    statuses = [r.status for r in gcs.requests(path_contains="manifest.json", method="GET")]
    assert statuses == [503, 503, 200]


def test_a_storage_outage_longer_than_the_budget_is_a_transient_error(bucket, gcs):
    uri = f"gs://{bucket}/manifest.json"
    storage.write_text(uri, "{}")
    gcs_lib.set_retry_budget(2.0)
    gcs.fail_next(1000, status=503, path_contains="manifest.json")

    with pytest.raises(TransientError, match="within the 2 s retry budget") as raised:
        storage.read_text(uri)

    assert raised.value.exit_code == 75
    assert len(gcs.requests(path_contains="manifest.json", status=503)) >= 2  # it did retry


def test_permission_denied_fails_at_once_naming_identity_and_role(bucket, gcs):
    gcs.deny(403, methods=["POST"], path_contains=f"/b/{bucket}/o")  # uploads to the bucket

    with pytest.raises(ConfigError) as raised:
        storage.write_text(f"gs://{bucket}/out/probe", "x")

    message = str(raised.value)
    assert message.startswith(f"permission denied to write gs://{bucket}/out/probe as anonymous (emulator)")
    assert gcs_lib.WRITE_ROLE in message and "\n" not in message
    assert TEST_TOKEN not in message
    assert len(gcs.requests(method="POST", path_contains=f"/b/{bucket}/o")) == 1  # not retried
    assert raised.value.exit_code == 64


def test_upload_skips_an_intact_copy_and_replaces_a_different_one(bucket, gcs, tmp_path):
    local = tmp_path / "train-00000-of-00001.tfrecord"
    local.write_bytes(b"records" * 1000)
    uri = f"gs://{bucket}/ds/{local.name}"

    assert gcs_lib.upload_file(str(local), uri) is True
    assert gcs_lib.upload_file(str(local), uri) is False  # same size and crc32c: nothing sent
    local.write_bytes(b"RECORDS" * 1000)  # same size, different bytes
    assert gcs_lib.upload_file(str(local), uri) is True
    assert storage.read_bytes(uri) == b"RECORDS" * 1000


def test_download_checks_the_size_the_manifest_promised(bucket, tmp_path):
    uri = f"gs://{bucket}/ds/shard.tfrecord"
    storage.write_bytes(uri, b"x" * 100)

    gcs_lib.download_file(uri, str(tmp_path / "ok"), expected_size=100)
    assert (tmp_path / "ok").read_bytes() == b"x" * 100
    with pytest.raises(DataError, match="has 100 bytes, the manifest says 120"):
        gcs_lib.download_file(uri, str(tmp_path / "bad"), expected_size=120)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_missing_credentials_are_a_config_error_with_the_ways_to_fix_it(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    gcs_module_reset()
    try:
        with pytest.raises(ConfigError, match="no Google Cloud credentials found; use Workload Identity") as raised:
            storage.read_text("gs://bucket/manifest.json")
        assert raised.value.exit_code == 64
    finally:
        gcs_module_reset()


def test_a_missing_bucket_is_a_config_error_naming_it_for_listing_reading_and_writing(bucket, gcs):
    missing = f"{bucket}-typo"
    calls = {
        "exists": lambda: storage.exists(f"gs://{missing}/run/state.json"),  # falls through to a listing
        "glob": lambda: storage.glob(f"gs://{missing}/data/train-*.tfrecord"),
        "read": lambda: storage.read_text(f"gs://{missing}/data/manifest.json"),
        "write": lambda: storage.write_text(f"gs://{missing}/run/.probe", "x"),
    }

    for name, call in calls.items():
        with pytest.raises(ConfigError) as raised:
            call()
        assert str(raised.value).startswith(f"bucket {missing} does not exist (gs://{missing}/"), name
        assert "check the bucket name in output.dir / data.dataset" in str(raised.value), name


def test_a_denied_listing_fails_at_once_naming_identity_and_role(bucket, gcs):
    storage.write_text(f"gs://{bucket}/run/a.json", "{}")
    gcs.deny(403, methods=["GET"], path_contains=f"/b/{bucket}/o?")  # object listings only

    with pytest.raises(ConfigError) as raised:
        storage.glob(f"gs://{bucket}/run/*.json")

    assert str(raised.value).startswith(f"permission denied to list gs://{bucket}/run/ as anonymous (emulator)")
    assert gcs_lib.READ_ROLE in str(raised.value)
    assert len(gcs.requests(method="GET", path_contains=f"/b/{bucket}/o?")) == 1  # not retried
