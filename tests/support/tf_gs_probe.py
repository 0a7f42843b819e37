"""Exercise TensorFlow's native gs:// filesystem against the test harness; print one JSON object.

Run in a subprocess with ``GcsEmulator.env()`` inside scripts/sandbox.sh (TF reads the GCS
variables once, at its first gs:// access)::

    python tests/support/tf_gs_probe.py BUCKET LOCAL_DIR [--mb 20] [--only NAME ...]

Each check reports ``{"ok": bool, "error": "...", ...details}``; test_gcs_harness.py asserts on
them. Objects under ``faults/`` are expected to have faults armed by the caller:
``faults/retry-me`` (503 twice), ``faults/denied`` (403), ``faults/deleted`` (deleted by the
caller after ``faults/deleted`` was written by the test, before this runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _write(path, data: bytes) -> None:
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def _read(path) -> bytes:
    with tf.io.gfile.GFile(path, "rb") as f:
        return f.read()


@check
def check_dirs(root, _local, _mb):
    tf.io.gfile.makedirs(f"{root}/dirs/a/b")
    tf.io.gfile.makedirs(f"{root}/dirs/a/b")  # idempotent
    assert tf.io.gfile.exists(f"{root}/dirs/a/b")
    assert tf.io.gfile.isdir(f"{root}/dirs/a")
    assert not tf.io.gfile.exists(f"{root}/dirs/nope")
    return {"listdir": sorted(tf.io.gfile.listdir(f"{root}/dirs"))}


@check
def check_gfile(root, _local, _mb):
    with tf.io.gfile.GFile(f"{root}/gfile/hello.txt", "w") as f:
        f.write("hello gs://\n")
    with tf.io.gfile.GFile(f"{root}/gfile/hello.txt") as f:
        assert f.read() == "hello gs://\n"
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    _write(f"{root}/gfile/bytes.bin", data)
    assert _read(f"{root}/gfile/bytes.bin") == data
    _write(f"{root}/gfile/empty.bin", b"")
    assert _read(f"{root}/gfile/empty.bin") == b""
    assert tf.io.gfile.stat(f"{root}/gfile/bytes.bin").length == len(data)
    return {}


@check
def check_glob(root, _local, _mb):
    for name in ("a.txt", "b.txt", "c.csv", "sub/d.txt"):
        _write(f"{root}/glob/{name}", name.encode())
    return {
        "txt": sorted(tf.io.gfile.glob(f"{root}/glob/*.txt")),
        "nested": sorted(tf.io.gfile.glob(f"{root}/glob/*/*.txt")),
        "listdir": sorted(tf.io.gfile.listdir(f"{root}/glob")),
    }


@check
def check_ranged(root, _local, _mb):
    data = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    _write(f"{root}/ranged/obj.bin", data)
    with tf.io.gfile.GFile(f"{root}/ranged/obj.bin", "rb") as f:
        f.seek(1_000_003)
        assert f.read(1000) == data[1_000_003:1_001_003]
        f.seek(len(data) - 10)
        assert f.read() == data[-10:]
        f.seek(5)
        assert f.read(7) == data[5:12]
    return {}


def _records(seed, n):
    rng = random.Random(seed)
    return [rng.randbytes(rng.choice([0, 1, 100, 4000, 70_000])) for _ in range(n)]


@check
def check_tfrecord(root, _local, _mb):
    records = _records(2, 300)
    path = f"{root}/tfrecord/one.tfrecord"
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    got = [t.numpy() for t in tf.data.TFRecordDataset(path)]
    assert got == records, "TFRecord round trip differs"
    return {"records": len(got), "bytes": sum(map(len, got))}


@check
def check_parallel_reads(root, _local, _mb):
    files, expected = [], []
    for i in range(6):
        recs = _records(10 + i, 40)
        path = f"{root}/parallel/shard-{i:02d}.tfrecord"
        with tf.io.TFRecordWriter(path) as w:
            for r in recs:
                w.write(r)
        files.append(path)
        expected += recs
    ds = tf.data.TFRecordDataset(tf.io.gfile.glob(f"{root}/parallel/*.tfrecord"), num_parallel_reads=4)
    got = [t.numpy() for t in ds]
    ds2 = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=3, num_parallel_calls=3, deterministic=False
    )
    got2 = [t.numpy() for t in ds2]
    assert sorted(got) == sorted(expected), "num_parallel_reads differs"
    assert sorted(got2) == sorted(expected), "parallel interleave differs"
    return {"records": len(got)}


@check
def check_checkpoint(root, _local, _mb):
    v = tf.Variable([1.0, 2.0, 3.0])
    step = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(v=v, step=step)
    manager = tf.train.CheckpointManager(ckpt, f"{root}/ckpt", max_to_keep=2)
    for i in range(1, 4):
        v.assign([i, i * 10.0, i * 100.0])
        step.assign(i)
        manager.save(checkpoint_number=i)
    v2, step2 = tf.Variable([0.0, 0.0, 0.0]), tf.Variable(0, dtype=tf.int64)
    latest = tf.train.latest_checkpoint(f"{root}/ckpt")
    tf.train.Checkpoint(v=v2, step=step2).restore(latest).assert_consumed()
    assert v2.numpy().tolist() == [3.0, 30.0, 300.0] and int(step2.numpy()) == 3
    # plain write/read (no manager) too
    path = tf.train.Checkpoint(v=v).write(f"{root}/ckpt-plain/weights")
    v3 = tf.Variable([0.0, 0.0, 0.0])
    tf.train.Checkpoint(v=v3).read(path).assert_consumed()
    assert v3.numpy().tolist() == v.numpy().tolist()
    return {"latest": latest, "files": sorted(tf.io.gfile.listdir(f"{root}/ckpt"))}


@check
def check_rename(root, _local, _mb):
    _write(f"{root}/rename/src.bin", b"payload")
    tf.io.gfile.rename(f"{root}/rename/src.bin", f"{root}/rename/dst.bin")
    assert not tf.io.gfile.exists(f"{root}/rename/src.bin") and _read(f"{root}/rename/dst.bin") == b"payload"
    tf.io.gfile.copy(f"{root}/rename/dst.bin", f"{root}/rename/copy.bin")
    _write(f"{root}/rename/dir/x", b"x")
    _write(f"{root}/rename/dir/y", b"y")
    tf.io.gfile.rename(f"{root}/rename/dir", f"{root}/rename/dir2")
    assert sorted(tf.io.gfile.listdir(f"{root}/rename/dir2")) == ["x", "y"]
    try:
        tf.io.gfile.rename(f"{root}/rename/copy.bin", f"{root}/rename/dst.bin", overwrite=False)
        no_overwrite = "renamed anyway"
    except tf.errors.AlreadyExistsError:
        no_overwrite = "AlreadyExistsError"
    tf.io.gfile.rmtree(f"{root}/rename/dir2")
    assert not tf.io.gfile.exists(f"{root}/rename/dir2/x")
    return {"rename_without_overwrite": no_overwrite}


@check
def check_saved_model(root, _local, _mb):
    class Doubler(tf.Module):
        def __init__(self):
            self.k = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return x * self.k

    tf.saved_model.save(Doubler(), f"{root}/export/1")
    loaded = tf.saved_model.load(f"{root}/export/1")
    assert loaded(tf.constant([1.0, 2.5])).numpy().tolist() == [2.0, 5.0]
    return {}


@check
def check_summary(root, _local, _mb):
    writer = tf.summary.create_file_writer(f"{root}/logs")
    with writer.as_default():
        for i in range(5):
            tf.summary.scalar("loss", 1.0 / (i + 1), step=i)
        writer.flush()
        tf.summary.scalar("loss", 0.01, step=5)
    writer.close()
    files = tf.io.gfile.glob(f"{root}/logs/events.out.tfevents.*")
    values = [v.tag for f in files for e in tf.compat.v1.train.summary_iterator(f) for v in e.summary.value]
    return {"event_files": len(files), "scalars": len(values)}


@check
def check_faults(root, _local, _mb):
    out = {}
    start = time.monotonic()
    out["retry_me"] = _read(f"{root}/faults/retry-me").decode()
    out["retry_seconds"] = round(time.monotonic() - start, 2)
    for name in ("denied", "deleted"):
        try:
            _read(f"{root}/faults/{name}")
            out[name] = "read succeeded"
        except tf.errors.OpError as err:
            out[name] = type(err).__name__
    # Deleted while open: the stat on open succeeds, later reads fail.
    data = random.Random(3).randbytes(2 * 1024 * 1024)
    _write(f"{root}/faults/vanishing", data)
    from google.cloud import storage  # STORAGE_EMULATOR_HOST is set: anonymous client

    with tf.io.gfile.GFile(f"{root}/faults/vanishing", "rb") as f:
        first = f.read(10)
        storage.Client().bucket(root[5:].split("/")[0]).blob("faults/vanishing").delete()
        try:
            f.seek(1_500_000)
            f.read(100)
            out["deleted_while_open"] = "read succeeded"
        except tf.errors.OpError as err:
            out["deleted_while_open"] = type(err).__name__
    assert first == data[:10]
    return out


def _rate(mb, seconds):
    return round(mb / seconds, 1) if seconds > 0 else float("inf")


@check
def check_throughput(root, local, mb):
    """MB/s of writing and reading ``mb`` MB: one GFile object, and TFRecords of 100 KB records."""
    data = os.urandom(mb * 1024 * 1024)
    record = 100 * 1024
    records = [data[i : i + record] for i in range(0, len(data), record)]
    out = {"mb": mb}
    for where, base in (("gcs", f"{root}/throughput"), ("local", os.path.join(local, "throughput"))):
        tf.io.gfile.makedirs(base)
        t = time.perf_counter()
        _write(f"{base}/blob.bin", data)
        out[f"{where}_gfile_write"] = _rate(mb, time.perf_counter() - t)
        t = time.perf_counter()
        assert _read(f"{base}/blob.bin") == data
        out[f"{where}_gfile_read"] = _rate(mb, time.perf_counter() - t)
        t = time.perf_counter()
        with tf.io.TFRecordWriter(f"{base}/shard.tfrecord") as w:
            for r in records:
                w.write(r)
        out[f"{where}_tfrecord_write"] = _rate(mb, time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(1 for _ in tf.data.TFRecordDataset(f"{base}/shard.tfrecord", buffer_size=8 * 1024 * 1024))
        out[f"{where}_tfrecord_read"] = _rate(mb, time.perf_counter() - t)
        assert n == len(records)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("bucket")
    parser.add_argument("local_dir")
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    root = f"gs://{args.bucket}"
    results = {}
    for name, fn in CHECKS.items():
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        try:
            results[name] = {"ok": True, **(fn(root, args.local_dir, args.mb) or {})}
        except Exception as err:
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - t, 2)
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
