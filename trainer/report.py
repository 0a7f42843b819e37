"""The evaluation report of an exported model on a prepared split: the evidence behind one number.

``evaluation.json`` holds per-class precision, recall, F1 and support; macro and weighted
averages; top-1 and top-k accuracy; the confusion matrix and the most confused class pairs;
calibration (expected calibration error over equal-width confidence bins, with the reliability
table); and every misclassified image (its source path, true and predicted class, score).
``confusion-matrix.png`` draws the matrix.

Predictions come from the exported SavedModel's serving signature, the function serving runs
(bytes in: decoding, centre crop, resize and preprocessing inside the graph), never from the
training-time model. A run computes its report at its end with every worker taking its share
of the split's records (each image exactly once); `trainer evaluate` does the same for any
export against any prepared split, in one process.

Conventions, as scikit-learn's: a class never predicted has precision 0 (and F1 0); the
macro average weighs classes equally, the weighted one by support.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer import storage
from trainer.contract import CONFUSION_MATRIX_FILE, EVALUATION_FILE

log = logging.getLogger(__name__)

SERVE_BATCH = 64
CALIBRATION_BINS = 15
MOST_CONFUSED = 10
TABLE_ROWS = 20


@dataclass
class Predictions:
    """The serving signature's output for some images of a split, with what they truly are."""

    probabilities: np.ndarray  # (images, classes) float32
    labels: np.ndarray  # (images,) int: the true class index
    sources: list[str]  # each image's path in the source folder, as `prepare` recorded it

    @staticmethod
    def concatenate(parts: Sequence[Predictions]) -> Predictions:
        return Predictions(
            np.concatenate([p.probabilities for p in parts]),
            np.concatenate([p.labels for p in parts]),
            [s for p in parts for s in p.sources],
        )

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, probabilities=self.probabilities, labels=self.labels, sources=np.asarray(self.sources))
        return buffer.getvalue()

    @staticmethod
    def from_npz(data: bytes) -> Predictions:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return Predictions(arrays["probabilities"], arrays["labels"], [str(s) for s in arrays["sources"]])


# --------------------------------------------------------------------------- predicting


def predict_records(serve, files: Sequence[str], stride: int = 1, offset: int = 0) -> Predictions:
    """Run the serving signature over the records of ``files`` (every ``stride``-th from ``offset``)."""
    from trainer.data.pipeline import labelled_records

    probabilities, labels, sources = [], [], []
    for encoded, label, source in labelled_records(files, stride, offset).batch(SERVE_BATCH):
        probabilities.append(serve(image_bytes=encoded)["probabilities"].numpy())
        labels.append(label.numpy())
        sources.extend(s.decode() for s in source.numpy())
    if not labels:
        return Predictions(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), [])
    return Predictions(np.concatenate(probabilities), np.concatenate(labels), sources)


# --------------------------------------------------------------------------- the report


def build_report(predictions: Predictions, class_names: Sequence[str], top_k: int = 5) -> dict[str, Any]:
    """Every figure of evaluation.json, from the predictions alone."""
    probs, labels = predictions.probabilities.astype(np.float64), predictions.labels.astype(np.int64)
    classes = len(class_names)
    predicted = probs.argmax(axis=1)
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    per_class = _per_class(matrix, class_names)
    support = matrix.sum(axis=1)
    k = min(top_k, classes)
    top_k_hits = (np.argsort(-probs, axis=1)[:, :k] == labels[:, None]).any(axis=1)
    true_probability = probs[np.arange(len(labels)), labels]
    return {
        "images": len(labels),
        "accuracy": float(np.mean(predicted == labels)),
        "top_k_accuracy": {"k": k, "accuracy": float(np.mean(top_k_hits))},
        "loss": float(np.mean(-np.log(np.clip(true_probability, 1e-7, 1.0)))),
        "macro_avg": {m: float(np.mean([row[m] for row in per_class])) for m in ("precision", "recall", "f1")},
        "weighted_avg": {
            m: float(np.average([row[m] for row in per_class], weights=support)) for m in ("precision", "recall", "f1")
        },
        "per_class": per_class,
        "confusion_matrix": {"classes": list(class_names), "rows_true_columns_predicted": matrix.tolist()},
        "most_confused": _most_confused(matrix, class_names),
        "calibration": _calibration(probs.max(axis=1), predicted == labels),
        "misclassified": _misclassified(predictions, predicted, class_names),
    }


def _per_class(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for index, name in enumerate(class_names):
        hits, predicted, support = matrix[index, index], matrix[:, index].sum(), matrix[index].sum()
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append(
            {
                "class": name,
                "precision": float(precision),
                "recall": float(recall),
                "f1": float(f1),
                "support": int(support),
            }
        )
    return rows


def _most_confused(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    off_diagonal = matrix.copy()
    np.fill_diagonal(off_diagonal, 0)
    pairs = sorted(np.argwhere(off_diagonal > 0).tolist(), key=lambda tp: (-off_diagonal[tp[0], tp[1]], tp[0], tp[1]))
    return [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "images": int(off_diagonal[t, p]),
            "share_of_true_class": float(off_diagonal[t, p] / matrix[t].sum()),
        }
        for t, p in pairs[:MOST_CONFUSED]
    ]


def _calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi], first bin [0, hi]
    table, error = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
        error += count / len(confidence) * abs(accuracy - mean_confidence)
        table.append(
            {
                "confidence_from": float(edges[b]),
                "confidence_to": float(edges[b + 1]),
                "images": count,
                "accuracy": accuracy,
                "mean_confidence": mean_confidence,
            }
        )
    return {"expected_calibration_error": float(error), "bins": bins, "reliability": table}


def _misclassified(predictions: Predictions, predicted: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Every wrong prediction, the most confident first (the ones to look at)."""
    probs, labels = predictions.probabilities, predictions.labels
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")]
    return [
        {
            "source": predictions.sources[i],
            "true": class_names[labels[i]],
            "predicted": class_names[predicted[i]],
            "score": float(probs[i, predicted[i]]),
            "true_class_probability": float(probs[i, labels[i]]),
        }
        for i in wrong
    ]


def split_report(
    predictions: Predictions, class_names: Sequence[str], split: str, expected_images: int, model: str, dataset: str,
    top_k: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """evaluation.json of one split: where its figures came from, then the figures.

    ``expected_images`` is the manifest's count: a report over fewer or more images than the
    split holds is a data error, not a report.
    """
    from trainer.errors import DataError
    from trainer.export import SIGNATURE

    if len(predictions.labels) != expected_images:
        raise DataError(
            f"the {split} split gave {len(predictions.labels)} images but the manifest lists {expected_images}; "
            "its shards do not match the manifest (damaged or replaced), re-run `trainer prepare`"
        )
    return {
        "split": split,
        "model": model,
        "dataset": dataset,
        "computed_with": f"the {SIGNATURE} signature of the exported SavedModel",
        **build_report(predictions, class_names, top_k),
    }


# --------------------------------------------------------------------------- output


def write_report(report: dict[str, Any], directory: str) -> dict[str, str]:
    """evaluation.json and confusion-matrix.png under ``directory`` (local or gs://); their paths."""
    paths = {"json": storage.join(directory, EVALUATION_FILE), "confusion_matrix": ""}
    storage.write_text(paths["json"], json.dumps(report, indent=2) + "\n")
    try:
        png = render_confusion_matrix(report["confusion_matrix"]["rows_true_columns_predicted"], report["per_class"])
        paths["confusion_matrix"] = storage.join(directory, CONFUSION_MATRIX_FILE)
        storage.write_bytes(paths["confusion_matrix"], png)
    except Exception as err:  # a drawing problem never loses the figures, which are written already
        log.warning("could not draw the confusion matrix: %s", err)
    return paths


def render_confusion_matrix(matrix: Sequence[Sequence[int]], per_class: Sequence[dict]) -> bytes:
    """PNG: rows are true classes, columns predicted; colour is the share of the row, text the count."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    names = [row["class"] for row in per_class]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * len(names), 30)
    figure = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, label="share of the true class")
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    if len(names) <= 25:
        for (t, p), count in np.ndenumerate(counts):
            if count:
                ax.text(p, t, str(count), ha="center", va="center", color="white" if shares[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({int(counts.sum())} images)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def table_lines(report: dict[str, Any], split: str) -> list[str]:
    """A short per-class table for the end of a run and the demo (the worst classes first when long)."""
    rows = report["per_class"]
    shown = rows if len(rows) <= TABLE_ROWS else sorted(rows, key=lambda r: r["f1"])[:TABLE_ROWS]
    width = max(5, *(len(r["class"]) for r in shown))
    top = report["top_k_accuracy"]
    lines = [
        f"{split}: accuracy {report['accuracy']:.3f}, top-{top['k']} {top['accuracy']:.3f}, "
        f"macro F1 {report['macro_avg']['f1']:.3f}, expected calibration error "
        f"{report['calibration']['expected_calibration_error']:.3f}, {report['images']} images",
        f"  {'class':<{width}}  precision  recall     f1  support",
    ]
    lines += [
        f"  {r['class']:<{width}}  {r['precision']:9.3f}  {r['recall']:6.3f}  {r['f1']:5.3f}  {r['support']:7d}"
        for r in shown
    ]
    if len(shown) < len(rows):
        lines.append(f"  ({len(rows) - len(shown)} more classes with higher F1 in evaluation.json)")
    confused = report["most_confused"][:3]
    if confused:
        lines.append(
            "  most confused: " + ", ".join(f"{c['true']} -> {c['predicted']} ({c['images']})" for c in confused)
        )
    return lines


# --------------------------------------------------------------------------- `trainer evaluate`


def evaluate_export(model_path: str, dataset: str, split: str = "test", top_k: int = 5) -> dict[str, Any]:
    """The report of any export on any prepared split (local or gs://), in this process."""
    from trainer.data import pipeline
    from trainer.data.manifest import read_manifest
    from trainer.errors import ConfigError, DataError
    from trainer.export import load_serving
    from trainer.predict import read_labels, saved_model_dir

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    saved_model = saved_model_dir(model_path)
    manifest = read_manifest(dataset)
    if not manifest.has_split(split):
        present = ", ".join(s for s in manifest.counts if manifest.has_split(s))
        raise ConfigError(f"the dataset {dataset} has no {split} split; choose --split from: {present}")
    labels = read_labels(saved_model, manifest.num_classes)
    if labels != manifest.class_names:
        raise DataError(
            f"the model's classes ({', '.join(labels[:5])}...) are not the dataset's "
            f"({', '.join(manifest.class_names[:5])}...); evaluate it on a dataset prepared with the same class folders"
        )
    serve = load_serving(saved_model)
    with pipeline.naming_damaged_shards(dataset, manifest):
        predictions = predict_records(serve, pipeline.shard_paths(dataset, manifest, split))
    return split_report(
        predictions, manifest.class_names, split, manifest.split_size(split), saved_model, dataset, top_k
    )


def evaluate_command(model_path: str, dataset: str, split: str, output: str | None, top_k: int) -> None:
    report = evaluate_export(model_path, dataset, split, top_k)
    paths = write_report(report, output or f"evaluation-{split}")
    for line in table_lines(report, split):
        print(line)
    print(
        f"report: {paths['json']}"
        + (f"; confusion matrix: {paths['confusion_matrix']}" if paths["confusion_matrix"] else "")
    )
