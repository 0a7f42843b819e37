"""Self-tests of the GCS test harness: real HTTP(S), google-cloud-storage and TF's native gs://.

Run inside the sandbox: scripts/sandbox.sh .venv/bin/python -m pytest -q tests/support
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.support.gcs import SANDBOX_HINT, STORAGE_HOSTS, in_sandbox

# The fixtures (gcs, gcs_clean, gcs_bucket, gcs_env). tests/conftest.py registers the same plugin for the
# whole suite; registering it here as well is a no-op then, and lets this directory run on its own.
pytest_plugins = ["tests.support.gcs_fixtures"]

PROBE = Path(__file__).with_name("tf_gs_probe.py")
THROUGHPUT_MB = 20


def _raw(gcs, method, path, body=None, headers=None, *, listener="client"):
    """One raw HTTP request through a proxy listener; returns (status, headers dict, body)."""
    if listener == "tls":
        ctx = ssl.create_default_context(cafile=gcs.ca_file)
        conn = http.client.HTTPSConnection("storage.googleapis.com", gcs.tls_port, context=ctx, timeout=30)
    elif listener == "http":
        conn = http.client.HTTPConnection("www.googleapis.com", gcs.http_port, timeout=30)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", int(gcs.endpoint.rsplit(":", 1)[1]), timeout=30)
    try:
        conn.request(
            method,
            path,
            body=body,
            headers=headers or {},
            encode_chunked=bool(headers and headers.get("Transfer-Encoding") == "chunked"),
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Sandbox and harness basics
# ---------------------------------------------------------------------------------------------


def test_sandbox_resolves_storage_hosts_to_loopback():
    assert in_sandbox(), SANDBOX_HINT
    assert socket.gethostbyname("www.googleapis.com") == "127.0.0.1"
    assert os.environ.get("NO_GCE_CHECK") == "true"


def test_fixture_fails_with_a_hint_outside_the_sandbox(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname", lambda host: "142.250.1.1")
    from tests.support.gcs_fixtures import require_sandbox

    with pytest.raises(pytest.fail.Exception, match=r"run the tests through scripts/sandbox\.sh"):
        require_sandbox()
    assert "scripts/test.sh" in SANDBOX_HINT


def test_env_has_what_subprocesses_need(gcs):
    env = gcs.env()
    assert env["STORAGE_EMULATOR_HOST"] == gcs.endpoint
    assert Path(env["CURL_CA_BUNDLE"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert env["GOOGLE_AUTH_TOKEN_FOR_TESTING"] and env["NO_GCE_CHECK"] == "true"
    assert "GCS_RETRY_CONFIG_INIT_DELAY_TIME_US" in gcs.env(tf_fast_retries=True)


def test_direct_helpers(gcs_bucket, gcs):
    gcs.put_object(gcs_bucket, "a/b.bin", b"\x00\x01")
    gcs.put_object(gcs_bucket, "a/empty", b"")
    assert gcs.get_object(gcs_bucket, "a/b.bin") == b"\x00\x01"
    assert gcs.get_object(gcs_bucket, "a/empty") == b""
    assert gcs.list_objects(gcs_bucket, "a/") == ["a/b.bin", "a/empty"]
    gcs.delete_object(gcs_bucket, "a/b.bin")
    with pytest.raises(KeyError):
        gcs.get_object(gcs_bucket, "a/b.bin")
    with pytest.raises(KeyError):
        gcs.delete_object(gcs_bucket, "a/b.bin")
    assert gcs.request_log == []  # direct access bypasses the proxy


def test_the_certificate_names_both_storage_hosts_and_chains_to_the_ca(gcs):
    """TF's gs:// connects to either host name; each must verify against the CA in CURL_CA_BUNDLE."""
    context = ssl.create_default_context(cafile=gcs.env()["CURL_CA_BUNDLE"])
    for host in STORAGE_HOSTS:
        raw = socket.create_connection(("127.0.0.1", gcs.tls_port), timeout=10)
        with context.wrap_socket(raw, server_hostname=host) as tls:  # verifies the chain and the name
            names = [value for kind, value in tls.getpeercert()["subjectAltName"] if kind == "DNS"]
        assert host in names


# ---------------------------------------------------------------------------------------------
# google-cloud-storage through the proxy
# ---------------------------------------------------------------------------------------------


def test_python_client_from_env_alone_is_anonymous_and_round_trips(gcs_bucket, gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs.environ():
        client = storage.Client()  # no credentials, no project arguments: env only
    assert isinstance(client._credentials, AnonymousCredentials)
    bucket = client.bucket(gcs_bucket)
    bucket.blob("dir/small.txt").upload_from_string(b"hello")
    bucket.blob("dir/empty").upload_from_string(b"")
    big = os.urandom(1024 * 1024 + 3)
    with bucket.blob("dir/big.bin").open("wb", chunk_size=256 * 1024) as f:  # resumable: chunks, 308 between
        f.write(big)
    assert bucket.blob("dir/small.txt").download_as_bytes() == b"hello"
    assert bucket.blob("dir/empty").download_as_bytes() == b""
    assert bucket.blob("dir/big.bin").download_as_bytes() == big
    assert bucket.blob("dir/big.bin").download_as_bytes(start=10, end=19) == big[10:20]
    assert sorted(b.name for b in client.list_blobs(gcs_bucket, prefix="dir/")) == [
        "dir/big.bin",
        "dir/empty",
        "dir/small.txt",
    ]
    assert [r.status for r in gcs.requests(method="PUT", path_contains="upload_id")].count(308) >= 3
    assert gcs.requests_by_listener["client"] == len(gcs.request_log)


def test_python_client_retries_503_with_its_default_retry(gcs_bucket, gcs):
    client = gcs.client()
    blob = client.bucket(gcs_bucket).blob("flaky.bin")
    blob.upload_from_string(b"payload")
    gcs.reset()
    gcs.fail_next(2, status=503, methods=["GET"], path_contains="flaky.bin")
    assert client.bucket(gcs_bucket).blob("flaky.bin").download_as_bytes() == b"payload"
    assert [r.status for r in gcs.requests(path_contains="flaky.bin")] == [503, 503, 200]


def test_python_client_dropped_connection_is_retried(gcs_bucket, gcs):
    client = gcs.client()
    client.bucket(gcs_bucket).blob("drop.bin").upload_from_string(b"x")
    gcs.reset()
    gcs.drop_next(1, methods=["GET"], path_contains="drop.bin")
    assert client.bucket(gcs_bucket).blob("drop.bin").download_as_bytes() == b"x"
    assert [r.status for r in gcs.requests(path_contains="drop.bin")] == [0, 200]


def test_python_client_403_is_forbidden_and_not_retried(gcs_bucket, gcs):
    from google.api_core.exceptions import Forbidden

    client = gcs.client()
    client.bucket(gcs_bucket).blob("secret.bin").upload_from_string(b"x")
    gcs.reset()
    gcs.deny(403, path_contains="secret.bin")
    start = time.monotonic()
    with pytest.raises(Forbidden, match=r"storage\.objects\.get"):
        client.bucket(gcs_bucket).blob("secret.bin").download_as_bytes()
    assert time.monotonic() - start < 2
    assert [r.status for r in gcs.requests(path_contains="secret.bin")] == [403]
    gcs.allow()
    assert client.bucket(gcs_bucket).blob("secret.bin").download_as_bytes() == b"x"


def test_generation_preconditions_are_enforced(gcs_bucket, gcs):
    from google.api_core.exceptions import PreconditionFailed

    bucket = gcs.client().bucket(gcs_bucket)
    blob = bucket.blob("once")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        bucket.blob("once").upload_from_string(b"second", if_generation_match=0)
    blob.reload()
    bucket.blob("once").upload_from_string(b"third", if_generation_match=blob.generation)
    with pytest.raises(PreconditionFailed):
        bucket.blob("once").delete(if_generation_match=blob.generation)  # stale generation
    assert bucket.blob("once").download_as_bytes() == b"third"
    assert gcs.fixups["precondition_failed"] == 2

    # Resumable: checked again on the session's PUTs, so an object created meanwhile wins (412).
    from google.resumable_media.common import InvalidResponse

    writer = bucket.blob("race").open("wb", chunk_size=256 * 1024, if_generation_match=0)
    with pytest.raises(InvalidResponse, match="412"), writer as f:
        f.write(os.urandom(300_000))  # session started, first chunk sent
        gcs.put_object(gcs_bucket, "race", b"someone else")
        f.write(os.urandom(300_000))
    assert gcs.get_object(gcs_bucket, "race") == b"someone else"


# ---------------------------------------------------------------------------------------------
# The proxy's fixes, over raw HTTP
# ---------------------------------------------------------------------------------------------


def test_chunked_request_bodies_are_dechunked(gcs_bucket, gcs):
    data = os.urandom(300_000)
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    status, _, _ = _raw(
        gcs,
        "POST",
        f"/upload/storage/v1/b/{gcs_bucket}/o?uploadType=media&name=chunky",
        chunks,
        {"Transfer-Encoding": "chunked", "Content-Type": "application/octet-stream"},
    )
    assert status == 200
    assert gcs.get_object(gcs_bucket, "chunky") == data
    assert gcs.fixups["dechunked"] == 1


def test_empty_media_upload_creates_a_zero_byte_object(gcs_bucket, gcs):
    marker = f"/upload/storage/v1/b/{gcs_bucket}/o?uploadType=media&name=d%2F&ifGenerationMatch=0"
    status, _, body = _raw(gcs, "POST", marker, b"", {"Content-Type": "application/octet-stream"}, listener="tls")
    assert status == 200, body
    assert json.loads(body)["name"] == "d/" and json.loads(body)["size"] == "0"
    assert gcs.get_object(gcs_bucket, "d/") == b""
    assert gcs.fixups["empty_media"] == 1
    status, _, _ = _raw(gcs, "POST", marker, b"", listener="tls")
    assert status == 412  # create-only, as on GCS


def test_truncated_upload_from_a_killed_client_is_not_forwarded(gcs_bucket, gcs):
    port = int(gcs.endpoint.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /upload/storage/v1/b/{gcs_bucket}/o?uploadType=media&name=half HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\n".encode()
            + b"x" * 500
        )
    deadline = time.monotonic() + 5
    while gcs.requests_by_listener["client"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert gcs.list_objects(gcs_bucket) == []
    assert gcs.request_log == []


def test_storage_layout_is_answered(gcs_bucket, gcs):
    status, _, body = _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}/storageLayout", listener="tls")
    assert status == 200 and json.loads(body)["hierarchicalNamespace"] == {"enabled": False}
    assert _raw(gcs, "GET", "/storage/v1/b/no-such-bucket/storageLayout")[0] == 404


@pytest.mark.parametrize("listener", ["tls", "http"])
def test_google_host_names_reach_the_emulator_with_host_based_locations(gcs_bucket, gcs, listener):
    gcs.put_object(gcs_bucket, "obj", b"0123456789")
    status, headers, body = _raw(gcs, "GET", f"/{gcs_bucket}/obj", headers={"Range": "bytes=2-5"}, listener=listener)
    assert (status, body, headers["content-range"]) == (206, b"2345", "bytes 2-5/10")
    status, headers, _ = _raw(
        gcs,
        "POST",
        f"/upload/storage/v1/b/{gcs_bucket}/o?uploadType=resumable&name=up",
        b"",
        {"X-Upload-Content-Type": "text/plain"},
        listener=listener,
    )
    assert status == 200
    location = urllib.parse.urlsplit(headers["location"])
    expected = ("https", "storage.googleapis.com") if listener == "tls" else ("http", "www.googleapis.com")
    assert (location.scheme, location.hostname) == expected  # from the Host header; https for TLS clients
    path = f"{location.path}?{location.query}"
    status, _, body = _raw(gcs, "PUT", path, b"uploaded", {"Content-Range": "bytes 0-7/8"}, listener=listener)
    assert status == 200 and json.loads(body)["size"] == "8"
    assert gcs.get_object(gcs_bucket, "up") == b"uploaded"
    assert gcs.requests_by_listener[listener] == 3


def test_fault_rules_match_method_and_path_and_expire(gcs_bucket, gcs):
    gcs.put_object(gcs_bucket, "o", b"x")
    gcs.fail_next(1, status=429, methods=["POST"])
    gcs.fail_next(2, status=500, path_contains="/o/o")
    assert _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}")[0] == 200
    status, _, body = _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}/o/o")
    assert status == 500 and json.loads(body)["error"]["errors"][0]["reason"] == "backendError"
    assert _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}/o/o")[0] == 500
    assert _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}/o/o")[0] == 200
    assert _raw(gcs, "POST", f"/storage/v1/b/{gcs_bucket}/o/o/copyTo/b/{gcs_bucket}/o/p", b"")[0] == 429
    assert [r.status for r in gcs.request_log] == [200, 500, 500, 200, 429]
    gcs.delay_next(1, seconds=0.5)
    start = time.monotonic()
    assert _raw(gcs, "GET", f"/storage/v1/b/{gcs_bucket}")[0] == 200
    assert time.monotonic() - start >= 0.5


# ---------------------------------------------------------------------------------------------
# TensorFlow's native gs:// (one subprocess runs tf_gs_probe.py; tests assert on its report)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_probe(gcs, tmp_path_factory):
    gcs.reset()
    bucket = "tf-probe"
    gcs.create_bucket(bucket)
    gcs.put_object(bucket, "faults/retry-me", b"retried")
    gcs.put_object(bucket, "faults/deleted", b"soon gone")
    gcs.delete_object(bucket, "faults/deleted")
    gcs.fail_next(2, status=503, methods=["GET"], path_contains="faults/retry-me")
    gcs.deny(403, path_contains="faults/denied")
    env = {**os.environ, **gcs.env(tf_fast_retries=True), "TF_CPP_MIN_LOG_LEVEL": "2"}
    local = tmp_path_factory.mktemp("tf-local")
    proc = subprocess.run(
        [sys.executable, str(PROBE), bucket, str(local), "--mb", str(THROUGHPUT_MB)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["_log"] = gcs.request_log
    report["_fixups"] = collections.Counter(gcs.fixups)
    gcs.reset()
    return report


TF_CHECKS = [
    "dirs",
    "gfile",
    "glob",
    "ranged",
    "tfrecord",
    "parallel_reads",
    "checkpoint",
    "rename",
    "saved_model",
    "summary",
    "faults",
    "throughput",
]


@pytest.mark.parametrize("check", TF_CHECKS)
def test_tf_gs_check_passes(tf_probe, check):
    result = tf_probe[check]
    assert result["ok"], result.get("trace") or result.get("error")


def test_tf_hit_both_emulator_pitfalls_and_the_proxy_fixed_them(tf_probe):
    assert tf_probe["_fixups"]["dechunked"] > 0  # TF's resumable PUTs are chunked (with a Content-Length too)
    assert tf_probe["_fixups"]["empty_media"] > 0  # makedirs markers
    assert tf_probe["_fixups"]["storage_layout"] > 0  # directory rename
    assert all(r.status != 502 for r in tf_probe["_log"]), "the emulator failed on a request"


def test_tf_listing_and_checkpoint_contents(tf_probe):
    assert tf_probe["dirs"]["listdir"] == ["a/"]
    assert tf_probe["glob"]["txt"] == ["gs://tf-probe/glob/a.txt", "gs://tf-probe/glob/b.txt"]
    assert tf_probe["glob"]["nested"] == ["gs://tf-probe/glob/sub/d.txt"]
    assert tf_probe["checkpoint"]["latest"] == "gs://tf-probe/ckpt/ckpt-3"
    assert "ckpt-1.index" not in tf_probe["checkpoint"]["files"]  # max_to_keep=2 deleted it
    assert tf_probe["rename"]["rename_without_overwrite"] == "AlreadyExistsError"
    assert tf_probe["summary"] == {**tf_probe["summary"], "event_files": 1, "scalars": 6}


def test_tf_faults(tf_probe):
    faults = tf_probe["faults"]
    assert faults["retry_me"] == "retried"
    statuses = [r.status for r in tf_probe["_log"] if "retry-me" in urllib.parse.unquote(r.path)]
    assert statuses[:3] == [503, 503, 200]
    assert faults["denied"] == "PermissionDeniedError"
    assert faults["deleted"] == "NotFoundError"
    # TF fetched the whole (< 64 MB) object on the first read, so deleting it later does not show.
    assert faults["deleted_while_open"] == "read succeeded"


def test_throughput_report(tf_probe, gcs_bucket, gcs, tmp_path, capsys):
    t = tf_probe["throughput"]
    client = gcs.client()
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(THROUGHPUT_MB * 1024 * 1024))
    blob = client.bucket(gcs_bucket).blob("throughput/blob.bin")
    start = time.perf_counter()
    blob.upload_from_filename(str(src))
    py_up = THROUGHPUT_MB / (time.perf_counter() - start)
    start = time.perf_counter()
    blob.download_to_filename(str(tmp_path / "back.bin"))
    py_down = THROUGHPUT_MB / (time.perf_counter() - start)
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    start = time.perf_counter()
    shutil.copyfile(src, tmp_path / "copy.bin")
    local_copy = THROUGHPUT_MB / (time.perf_counter() - start)
    rows = [
        ("TF GFile write", t["gcs_gfile_write"], t["local_gfile_write"]),
        ("TF GFile read", t["gcs_gfile_read"], t["local_gfile_read"]),
        ("TF TFRecord write (100 KB records)", t["gcs_tfrecord_write"], t["local_tfrecord_write"]),
        ("TF TFRecordDataset read", t["gcs_tfrecord_read"], t["local_tfrecord_read"]),
        ("google-cloud-storage upload / local copy", round(py_up, 1), round(local_copy, 1)),
        ("google-cloud-storage download / local copy", round(py_down, 1), round(local_copy, 1)),
    ]
    with capsys.disabled():
        print(f"\n\nGCS emulator vs local disk, {THROUGHPUT_MB} MB, MB/s (emulator through the proxy, in the sandbox):")
        for name, remote, local in rows:
            print(f"  {name:44s} emulator {remote:8.1f}   local {local:8.1f}   ratio {remote / local:6.3f}")
    assert all(remote > 0 for _, remote, _ in rows)
