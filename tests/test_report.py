"""The evaluation report's figures against an independent computation (scikit-learn and plain
loops) on the same predictions, and its files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics

from trainer.report import Predictions, build_report, table_lines, write_report

CLASSES = ["cat", "dog", "fox", "owl"]


def _predictions(seed: int = 0, images: int = 200) -> Predictions:
    """Noisy predictions: mostly right, some confident mistakes, one class never predicted."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), images)
    logits = rng.normal(0, 1, (images, len(CLASSES)))
    logits[np.arange(images), labels] += 2.0
    logits[:, 3] -= 10.0  # "owl" is never the top class: its precision is 0 by convention
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return Predictions(
        probabilities.astype(np.float32), labels, [f"test/{CLASSES[c]}/{i}.png" for i, c in enumerate(labels)]
    )


def _loop_ece(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    error = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(confidence) if (low < c <= high) or (b == 0 and c == 0.0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            error += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return error


def test_the_report_agrees_with_scikit_learn_and_a_plain_loop_on_the_same_predictions():
    predictions = _predictions()
    probabilities, labels = predictions.probabilities.astype(np.float64), predictions.labels
    predicted = probabilities.argmax(axis=1)

    report = build_report(predictions, CLASSES, top_k=2)

    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=range(len(CLASSES)), zero_division=0
    )
    for index, row in enumerate(report["per_class"]):
        assert row["class"] == CLASSES[index]
        assert row["precision"] == pytest.approx(precision[index])
        assert row["recall"] == pytest.approx(recall[index])
        assert row["f1"] == pytest.approx(f1[index])
        assert row["support"] == support[index]
    assert report["per_class"][3]["precision"] == 0.0  # never predicted
    for average, key in (("macro", "macro_avg"), ("weighted", "weighted_avg")):
        p, r, f, _ = metrics.precision_recall_fscore_support(
            labels, predicted, labels=range(len(CLASSES)), average=average, zero_division=0
        )
        assert report[key] == pytest.approx({"precision": p, "recall": r, "f1": f})
    assert report["accuracy"] == pytest.approx(metrics.accuracy_score(labels, predicted))
    assert report["top_k_accuracy"] == {
        "k": 2,
        "accuracy": pytest.approx(metrics.top_k_accuracy_score(labels, probabilities, k=2, labels=range(4))),
    }
    normalised = probabilities / probabilities.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7
    assert report["loss"] == pytest.approx(metrics.log_loss(labels, normalised, labels=range(4)), rel=1e-5)
    matrix = metrics.confusion_matrix(labels, predicted, labels=range(len(CLASSES)))
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == matrix.tolist()
    confidence = probabilities.max(axis=1)
    assert report["calibration"]["expected_calibration_error"] == pytest.approx(
        _loop_ece(confidence, predicted == labels, 15)
    )
    assert sum(row["images"] for row in report["calibration"]["reliability"]) == len(labels)


def test_most_confused_pairs_and_the_misclassified_images_come_from_the_matrix():
    predictions = _predictions(seed=1)
    report = build_report(predictions, CLASSES)
    matrix = np.array(report["confusion_matrix"]["rows_true_columns_predicted"])
    np.fill_diagonal(matrix, 0)

    worst = report["most_confused"][0]
    assert worst["images"] == matrix.max()
    assert matrix[CLASSES.index(worst["true"]), CLASSES.index(worst["predicted"])] == matrix.max()
    wrong = report["misclassified"]
    assert len(wrong) == matrix.sum() == report["images"] - round(report["accuracy"] * report["images"])
    assert all(w["true"] != w["predicted"] and w["source"].startswith(f"test/{w['true']}/") for w in wrong)
    assert [w["score"] for w in wrong] == sorted((w["score"] for w in wrong), reverse=True)


def test_the_report_files_and_the_table(tmp_path):
    report = build_report(_predictions(), CLASSES)

    paths = write_report(report, str(tmp_path / "evaluation"))

    assert json.loads((tmp_path / "evaluation" / "evaluation.json").read_text()) == report
    assert (tmp_path / "evaluation" / "confusion-matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["confusion_matrix"].endswith("confusion-matrix.png")
    lines = table_lines(report, "test")
    assert len(lines) == 2 + len(CLASSES) + 1  # headline, header, a row per class, the most confused pairs
    assert lines[2].split()[0] == "cat"


def test_predictions_survive_the_trip_through_a_part_file():
    predictions = _predictions(images=7)

    again = Predictions.from_npz(predictions.to_npz())

    np.testing.assert_array_equal(again.probabilities, predictions.probabilities)
    np.testing.assert_array_equal(again.labels, predictions.labels)
    assert again.sources == predictions.sources
