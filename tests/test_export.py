"""Export a model, then classify files with it: same probabilities as the in-memory model."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras
from PIL import Image

from trainer.cli import main
from trainer.config import HeadConfig, ModelConfig
from trainer.contract import ExitCode
from trainer.data.pipeline import decode_for_eval
from trainer.export import export_model, load_serving
from trainer.layout import RunLayout
from trainer.model import build_model
from trainer.predict import predict_files

CLASSES = ["cats", "dogs", "owls"]
SIZE = 32


def _image_bytes(fmt: str, seed: int, shape=(48, 60)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = build_model(len(CLASSES), SIZE, ModelConfig(weights="none", head=HeadConfig(dense_units=[8])), seed=3)
    layout = RunLayout(str(root / "run"))
    paths = export_model(model, CLASSES, SIZE, 0.875, layout)
    images = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG"]):
        path = root / f"img{i}.{fmt.lower()}"
        path.write_bytes(_image_bytes(fmt, seed=i))
        images.append(str(path))
    return model, layout, paths, images


def _in_memory_probabilities(model, images: list[str]) -> np.ndarray:
    batch = tf.stack([decode_for_eval(tf.constant(Path(p).read_bytes()), SIZE, 0.875) for p in images])
    return model(batch, training=False).numpy()


def test_export_writes_saved_model_keras_file_and_labels(exported):
    _, layout, paths, _ = exported
    assert paths == {"saved_model": layout.saved_model, "keras_model": layout.keras_model, "labels": layout.labels}
    assert Path(layout.labels).read_text().splitlines() == CLASSES
    reloaded = keras.models.load_model(layout.keras_model)
    assert reloaded.output_shape == (None, len(CLASSES))


def test_predict_gives_the_in_memory_models_probabilities(exported):
    model, layout, _, images = exported

    predictions = predict_files(layout.export, images, top_k=3)

    expected = _in_memory_probabilities(model, images)
    np.testing.assert_allclose(np.stack([p.probabilities for p in predictions]), expected, rtol=1e-5, atol=1e-6)
    for prediction, probs in zip(predictions, expected, strict=True):
        assert [label for label, _ in prediction.top] == [CLASSES[i] for i in np.argsort(-probs)]


def test_serving_signature_takes_bytes_and_returns_labels(exported):
    _, layout, _, images = exported
    serve = load_serving(layout.saved_model)

    out = serve(image_bytes=tf.constant([Path(p).read_bytes() for p in images]))

    probabilities = out["probabilities"].numpy()
    assert probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [label.decode() for label in out["label"].numpy()] == [CLASSES[i] for i in probabilities.argmax(axis=1)]


def test_predict_command_prints_top_k(exported, capsys):
    _, layout, _, images = exported

    assert main(["predict", layout.export, images[0], "--top-k", "2"]) == ExitCode.OK

    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{images[0]}: ") and line.count("%") == 2


def test_predict_on_a_file_that_is_not_an_image_is_a_data_error(exported, tmp_path, capsys):
    _, layout, _, _ = exported
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")

    assert main(["predict", layout.export, str(text)]) == ExitCode.DATA_ERROR

    err = capsys.readouterr().err
    assert err.startswith(f"error: 1 of 1 image(s) could not be classified: {text} (Unknown image file format")
    assert err.count("\n") == 1


def test_predict_classifies_the_good_images_and_names_each_bad_one(exported, tmp_path, capsys):
    _, layout, _, images = exported
    jpeg = Path(images[0]).read_bytes()
    bad = {"empty.jpg": b"", "cut.jpg": jpeg[: len(jpeg) // 3], "text.png": b"hello"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    args = [images[0], str(tmp_path / "empty.jpg"), images[1], str(tmp_path / "cut.jpg"), str(tmp_path / "gone.png"),
            str(tmp_path / "text.png"), images[2]]  # fmt: skip

    assert main(["predict", layout.export, *args, "--json"]) == ExitCode.DATA_ERROR

    out, err = capsys.readouterr()
    assert [json.loads(line)["image"] for line in out.splitlines()] == images  # the good ones, in order
    assert err.count("\n") == 1 and err.startswith("error: 4 of 7 image(s) could not be classified: ")
    assert err.endswith("; pass readable JPEG or PNG files (the others are classified above)\n")
    listed = err.split("could not be classified: ", 1)[1].rsplit("; pass readable JPEG or PNG files", 1)[0]
    named = [re.fullmatch(r"(\S+) \((.*)\)", item).groups() for item in listed.split("; ")]
    assert [path for path, _ in named] == [str(tmp_path / n) for n in ("empty.jpg", "cut.jpg", "gone.png", "text.png")]
    assert [reason for _, reason in named] == [
        "Input is empty", "jpeg::Uncompress failed. Invalid JPEG data or crop window", "no such file",
        "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required",
    ]  # fmt: skip


def test_predict_refuses_a_directory_argument_before_loading_the_model(exported, tmp_path, capsys):
    _, layout, _, images = exported

    assert main(["predict", layout.export, images[0], str(tmp_path)]) == ExitCode.CONFIG_ERROR

    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {tmp_path} is a directory, not an image; pass image files (e.g. {tmp_path}/*.jpg)\n"


def test_predict_with_a_saved_model_without_the_serving_signature_is_a_data_error(tmp_path, capsys):
    model = build_model(len(CLASSES), SIZE, ModelConfig(weights="none", head=HeadConfig(dense_units=[8])), seed=3)
    tf.saved_model.save(model, str(tmp_path / "saved_model"))  # a plain save: its signature takes pixels
    image = tmp_path / "a.png"
    image.write_bytes(_image_bytes("PNG", seed=1))

    assert main(["predict", str(tmp_path), str(image)]) == ExitCode.DATA_ERROR

    err = capsys.readouterr().err
    assert err.startswith(
        f"error: the SavedModel {tmp_path / 'saved_model'} has no serving_default signature taking image_bytes"
    )
    assert "(it has serving_default(" in err and "trainer.export.export_model" in err
    assert err.count("\n") == 1


def test_predict_without_an_export_is_a_config_error(tmp_path, capsys):
    assert main(["predict", str(tmp_path), "x.jpg"]) == ExitCode.CONFIG_ERROR
    assert "no SavedModel" in capsys.readouterr().err


# --------------------------------------------------------------------------- trainer evaluate


def _prepared(root: Path, classes: list[str], test_fraction: float = 0.25) -> str:
    from trainer.config import PrepareConfig
    from trainer.data.prepare import prepare_dataset

    for c, name in enumerate(classes):
        (root / "src" / name).mkdir(parents=True)
        for i in range(4):
            (root / "src" / name / f"{i}.png").write_bytes(_image_bytes("PNG", seed=10 * c + i))
    cfg = PrepareConfig(validation_fraction=0.25, test_fraction=test_fraction, min_shards=1, processes=1)
    prepare_dataset(str(root / "src"), str(root / "data"), cfg, progress=lambda _: None)
    return str(root / "data")


def test_evaluate_reports_the_serving_signatures_predictions_on_a_split(exported, tmp_path, capsys):
    _, layout, _, _ = exported
    dataset = _prepared(tmp_path, CLASSES)

    code = main(["evaluate", layout.root, dataset, "--split", "test", "--output", str(tmp_path / "report")])

    assert code == ExitCode.OK
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["split"] == "test" and report["images"] == 3  # one test image per class
    assert report["model"] == layout.saved_model
    assert [row["support"] for row in report["per_class"]] == [1, 1, 1]
    wrong = {m["source"] for m in report["misclassified"]}
    predictions = predict_files(layout.export, sorted(str(p) for p in (tmp_path / "src").glob("*/*.png")), top_k=1)
    mistaken = {p.path for p in predictions if p.top[0][0] != Path(p.path).parent.name}
    assert wrong <= {str(Path(p).relative_to(tmp_path / "src")) for p in mistaken}  # the same model, the same calls
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:5]] == CLASSES


def test_evaluate_refuses_a_dataset_of_other_classes_and_a_missing_split(exported, tmp_path, capsys):
    _, layout, _, _ = exported
    other = _prepared(tmp_path / "other", ["ants", "bees", "wasps"])
    no_test = _prepared(tmp_path / "no-test", CLASSES, test_fraction=0.0)

    assert main(["evaluate", layout.root, other]) == ExitCode.DATA_ERROR
    assert "are not the dataset's" in capsys.readouterr().err
    assert main(["evaluate", layout.root, no_test, "--split", "test"]) == ExitCode.CONFIG_ERROR
    assert "has no test split; choose --split from: train, validation" in capsys.readouterr().err


def test_evaluate_into_an_output_that_is_a_file_is_a_config_error(exported, tmp_path, capsys):
    _, layout, _, _ = exported
    dataset = _prepared(tmp_path, CLASSES)
    (tmp_path / "report").write_text("a file")

    assert main(["evaluate", layout.root, dataset, "--output", str(tmp_path / "report")]) == ExitCode.CONFIG_ERROR

    err = capsys.readouterr().err
    report = tmp_path / "report"
    assert (
        err
        == f"error: cannot write {report}/evaluation.json: {report} is a file, not a directory; choose another path\n"
    )


def test_evaluate_on_a_damaged_shard_names_it(exported, tmp_path, capsys):
    _, layout, _, _ = exported
    dataset = Path(_prepared(tmp_path, CLASSES))
    (shard,) = dataset.glob("test-*.tfrecord")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    shard.write_bytes(bytes(data))

    assert main(["evaluate", layout.root, str(dataset), "--output", str(tmp_path / "report")]) == ExitCode.DATA_ERROR

    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: shard {re.escape(str(shard))} is corrupt: the record at byte \d+ fails its checksum; "
        r"re-run `trainer prepare`\n",
        err,
    )
