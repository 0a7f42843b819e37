"""A 2-worker run with everything on gs:// (a real GCS emulator over HTTP, TF's native gs://).

Dataset, weights file, backups, TensorBoard logs, metrics log, best weights, export and
summary all live in the bucket; storage answers 503 now and then; the exported model then
predicts from its gs:// location.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.support.training import TINY_RUN, LogSink, set_args
from trainer.contract import ExitCode
from trainer.data.synthetic import make_demo_images
from trainer.launch import entrypoint_command, launch_local

pytestmark = pytest.mark.slow

RUN = [*TINY_RUN, "phases.fine_tuning.epochs=1", "output.evaluation_report=true"]  # the report on gs:// too


def _vgg16_notop_weights(path) -> None:
    import tf_keras as keras

    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(
        str(path), save_format="h5"
    )


def test_two_workers_train_and_export_on_gcs_through_storage_faults(gcs, gcs_bucket, tmp_path, monkeypatch):
    env = gcs.env(tf_fast_retries=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"gs://{gcs_bucket}"
    images = tmp_path / "images"
    classes = make_demo_images(str(images), classes=3, per_class=12, size=40, seed=4)
    prepared = subprocess.run(
        [*entrypoint_command(), "prepare", str(images), f"{bucket}/data", "--set", "prepare.min_shards=4",
         "--set", "prepare.validation_fraction=0.25"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    _vgg16_notop_weights(tmp_path / "vgg16_notop.h5")
    gcs.client().bucket(gcs_bucket).blob("weights/vgg16_notop.h5").upload_from_filename(tmp_path / "vgg16_notop.h5")

    # Transient storage faults on both paths: google-cloud-storage (manifest) and TF's gs:// (shards).
    gcs.fail_next(2, status=503, path_contains="manifest.json")
    gcs.fail_next(3, status=503, path_contains="train-0000")
    settings = [*RUN, f"data.dataset={bucket}/data", f"model.weights={bucket}/weights/vgg16_notop.h5",
                f"output.dir={bucket}/run", "data.staging.enabled=true"]  # fmt: skip
    monkeypatch.setenv("TRAINER_SCRATCH_DIR", str(tmp_path / "scratch"))
    log = LogSink()

    code = launch_local(2, ["train", *set_args(*settings)], sink=log)

    assert code == ExitCode.OK, log.text[-4000:]
    fingerprints = set(re.findall(r"weights fingerprint (\w+)", log.text))
    assert len(fingerprints) == 1 and len(re.findall(r"weights fingerprint", log.text)) == 2
    assert "loaded VGG16 base weights from gs://" in log.text
    # Each worker staged its own 2 of the 4 training shards to local disk.
    assert sorted(p.name for p in (tmp_path / "scratch" / "shards").iterdir()) == [
        f"train-0000{i}-of-00004.tfrecord" for i in range(4)
    ]
    assert len(gcs.requests(path_contains="manifest.json", status=503)) == 2
    assert len(gcs.requests(path_contains="train-0000", status=503)) == 3

    names = {blob.name for blob in gcs.client().list_blobs(gcs_bucket, prefix="run/")}
    assert {"run/summary.json", "run/state.json", "run/metrics.jsonl", "run/export/labels.txt",
            "run/export/model.keras", "run/export/saved_model/saved_model.pb"} <= names  # fmt: skip
    assert any(n.startswith("run/logs/fine_tuning/train/events.out.tfevents") for n in names)
    assert any(n.startswith("run/best/") for n in names)
    assert not [n for n in names if n.startswith("run/backup/")]  # removed once the phases completed
    summary = json.loads(gcs.client().bucket(gcs_bucket).blob("run/summary.json").download_as_bytes())
    assert summary["weights_fingerprint"] in fingerprints

    image = next((images / classes[0]).iterdir())
    predicted = subprocess.run(
        [*entrypoint_command(), "predict", f"{bucket}/run/export", str(image), "--json", "--top-k", "3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    top = json.loads(predicted.stdout)["top"]
    assert sorted(entry["label"] for entry in top) == sorted(classes)
    assert abs(sum(entry["probability"] for entry in top) - 1.0) < 1e-4

    # The evaluation report (no test split here: validation) lives in the bucket; evaluate reproduces it there.
    assert {"run/evaluation/validation/evaluation.json", "run/evaluation/validation/confusion-matrix.png"} <= names
    assert not [n for n in names if "predictions-worker" in n]
    evaluated = subprocess.run(
        [*entrypoint_command(), "evaluate", f"{bucket}/run", f"{bucket}/data", "--split", "validation",
         "--output", f"{bucket}/again"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(gcs.client().bucket(gcs_bucket).blob("again/evaluation.json").download_as_bytes())
    assert again["accuracy"] == pytest.approx(summary["evaluation"]["validation"]["accuracy"])
    assert again["images"] == summary["evaluation"]["validation"]["images"]
