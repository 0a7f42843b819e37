"""Exact evaluation: every image counted once, and no replica ever computes on an empty batch.

TensorFlow's oneDNN kernels fail on a zero-size batch on some CPUs (AVX-512 Xeons and EPYCs
among them), and tf.distribute gives a replica an empty batch whenever a split's last batch is
smaller than the number of replicas. These tests hold on every machine: they check the batch
sizes themselves rather than relying on the local kernels to reject an empty one.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.support.training import TINY_RUN, LogSink, make_tiny_dataset, set_args
from trainer.contract import ExitCode
from trainer.data import pipeline, records
from trainer.data.manifest import read_manifest
from trainer.errors import DataError
from trainer.launch import launch_local
from trainer.train.evaluation import EvaluationData, Evaluator, exact_input, exact_pass

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLASSES = 3


def _file_contents(images: int, shards: int) -> list[list[int]]:
    """Record ids per shard, as `prepare` deals them: record i to shard i % shards."""
    return [list(range(images))[j::shards] for j in range(shards)]


def _share_ids(share: pipeline.EvalShare, contents: dict[str, list[int]]) -> list[int]:
    """The ids a share reads: its whole files, or every stride-th record of all files in read order."""
    if share.stride == 1:
        return [i for path in share.files for i in contents[path]]
    in_order = sorted(i for path in share.files for i in contents[path])  # interleave reads round-robin
    return in_order[share.offset :: share.stride]


@pytest.mark.parametrize("replicas_per_worker", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_every_replica_gets_a_full_batch_and_every_image_counts_once(workers, replicas_per_worker):
    replicas = workers * replicas_per_worker
    for images in (1, 2, 7, 9, 17):
        for shards in sorted({1, 2, min(7, images)}):
            contents = dict(enumerate(_file_contents(images, shards)))
            paths = [f"shard-{j}" for j in range(shards)]
            by_path = {paths[j]: ids for j, ids in contents.items()}
            shares = pipeline.evaluation_shares(paths, [len(ids) for ids in contents.values()], workers)
            for batch in (1, 4):

                def elements(index: int, shares=shares, by_path=by_path) -> tf.data.Dataset:
                    ids = np.array(_share_ids(shares[index], by_path), dtype=np.float32)
                    return tf.data.Dataset.from_tensor_slices((ids, tf.one_hot(ids.astype(np.int32) % CLASSES, 3)))

                dataset_fn, steps = exact_input("test", [s.images for s in shares], replicas, batch, elements)
                counted: list[int] = []
                for worker in range(workers):
                    context = tf.distribute.InputContext(workers, worker, replicas)
                    batches = list(dataset_fn(context))
                    case = f"{images} images, {shards} shards, {workers}x{replicas_per_worker} replicas, batch {batch}"
                    # Each local replica takes one batch per step: steps x replicas_per_worker batches.
                    assert len(batches) == steps * replicas_per_worker, case
                    assert all(len(weights) == batch for _, _, weights in batches), case
                    for ids, _, weights in batches:
                        counted.extend(int(i) for i, w in zip(ids.numpy(), weights.numpy(), strict=True) if w == 1.0)
                        assert set(weights.numpy().tolist()) <= {0.0, 1.0}, case
                assert sorted(counted) == list(range(images)), case


def test_mirrored_replicas_never_see_an_empty_batch_and_the_figures_are_exact():
    # One process, two logical CPU devices: MirroredStrategy, as on a node with two GPUs.
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.mirrored_evaluation"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cases = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 4, result.stdout
    for case in cases:
        assert case["replicas"] == 2
        sizes = [size for step in case["replica_batches"] for size in step]
        assert sizes and set(sizes) == {case["batch"]}, case  # every replica, every step: a full batch
        reported = case["reported"]
        assert reported["images"] == case["images"]
        assert abs(reported["accuracy"] * case["images"] - case["correct"]) <= case["ambiguous"], case
        assert reported["loss"] == pytest.approx(case["loss"], rel=1e-4), case


def test_a_pass_that_counts_other_than_the_manifest_is_a_one_line_data_error():
    import tf_keras as keras

    strategy = tf.distribute.get_strategy()
    model = keras.Sequential([keras.layers.Dense(CLASSES, activation="softmax", input_shape=(2,))])
    labels = np.eye(CLASSES, dtype="float32")[[0] * 5]
    elements = tf.data.Dataset.from_tensor_slices((np.ones((5, 2), "float32"), labels))
    data = exact_pass(strategy, "validation", [5], 2, lambda _: elements)
    assert Evaluator(model).run(data)["images"] == 5

    damaged = EvaluationData("validation", data.dataset, data.steps, images=6)  # the manifest says 6
    with pytest.raises(DataError) as info:
        Evaluator(model).run(damaged)
    message = str(info.value)
    assert "\n" not in message and "gave 5 images but the manifest lists 6" in message and "trainer prepare" in message


# --------------------------------------------------------------------------- a real 2-worker run


def _split_examples(dataset: str, split: str) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, labels) of a split, read straight from its shards (not through the pipeline)."""
    manifest = read_manifest(dataset)
    encoded, labels = [], []
    for path in pipeline.shard_paths(dataset, manifest, split):
        for raw in tf.data.TFRecordDataset(path):
            example = tf.train.Example.FromString(raw.numpy())
            encoded.append(example.features.feature[records.ENCODED].bytes_list.value[0])
            labels.append(example.features.feature[records.LABEL].int64_list.value[0])
    return encoded, np.array(labels)


@pytest.mark.slow
def test_two_workers_report_what_the_exported_model_scores_on_odd_sized_splits(tmp_path):
    dataset = make_tiny_dataset(tmp_path)  # 9 validation and 9 test images
    manifest = read_manifest(dataset)
    global_batch = 2 * 4  # 2 workers x train.batch_size_per_replica=4 (TINY_RUN)
    for split in ("validation", "test"):
        assert 0 < manifest.split_size(split) % global_batch < 2  # the last global batch: fewer images than workers
    output = tmp_path / "run"
    log = LogSink()

    settings = [*TINY_RUN, "output.evaluation_report=true", f"data.dataset={dataset}", f"output.dir={output}"]
    code = launch_local(2, ["train", *set_args(*settings)], sink=log)

    assert code == ExitCode.OK, log.text[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    serve = tf.saved_model.load(str(output / "export" / "saved_model")).signatures["serving_default"]
    for split in ("validation", "test"):
        encoded, labels = _split_examples(dataset, split)
        probabilities = serve(image_bytes=tf.constant(encoded))["probabilities"].numpy()
        top2 = np.sort(probabilities, axis=1)[:, -2:]
        ambiguous = int((top2[:, 1] - top2[:, 0] < 1e-5).sum())
        correct = int((probabilities.argmax(axis=1) == labels).sum())
        loss = float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-7, 1.0)).mean())
        reported = summary["evaluation"][split]
        assert reported["images"] == len(labels) == manifest.split_size(split)
        assert abs(reported["accuracy"] * len(labels) - correct) <= ambiguous, (split, reported, correct)
        assert reported["loss"] == pytest.approx(loss, rel=1e-3), (split, reported, loss)
        if split == "test":
            _check_the_report(summary, output, probabilities, labels, dataset, tmp_path)


def _check_the_report(summary, output, probabilities, labels, dataset, tmp_path) -> None:
    """The run's evaluation report is the serving signature's predictions, each test image once,
    and `trainer evaluate` on the export reproduces it."""
    pointer = summary["evaluation_report"]
    assert pointer["split"] == "test" and pointer["json"] == str(output / "evaluation" / "test" / "evaluation.json")
    report = json.loads(pathlib.Path(pointer["json"]).read_text())
    assert pathlib.Path(pointer["confusion_matrix"]).read_bytes()[:4] == b"\x89PNG"
    assert not list((output / "evaluation" / "test").glob("predictions-worker-*"))  # the parts are joined and gone
    predicted = probabilities.argmax(axis=1)
    matrix = np.zeros((CLASSES, CLASSES), int)
    for true, guess in zip(labels, predicted, strict=True):
        matrix[true, guess] += 1
    assert report["images"] == len(labels) == sum(map(sum, report["confusion_matrix"]["rows_true_columns_predicted"]))
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == matrix.tolist()
    assert report["accuracy"] == pytest.approx(summary["evaluation"]["test"]["accuracy"])
    assert len(report["misclassified"]) == int((predicted != labels).sum())

    result = subprocess.run(
        [sys.executable, "-m", "trainer", "evaluate", str(output), dataset, "--output", str(tmp_path / "again")],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    for key in ("images", "accuracy", "confusion_matrix", "per_class", "top_k_accuracy"):
        assert again[key] == report[key], key
    assert again["loss"] == pytest.approx(report["loss"], rel=1e-5)

    def wrong(r):  # the order among equal scores, and the last float bits, may differ between processes
        return sorted((m["source"], m["true"], m["predicted"], round(m["score"], 4)) for m in r["misclassified"])

    assert wrong(again) == wrong(report)
