"""Classify image files with an exported model (the SavedModel's serving signature).

Bad images do not stop the others: every readable JPEG/PNG (GIF, BMP) is classified and
printed, then one ``error:`` line names each image that could not be (missing, unreadable or
not decodable, with the reason) and the command exits 65 (DATA_ERROR). A whole batch goes
through the signature at once; only a batch that fails is retried image by image, to find
which images are bad. Arguments that cannot be images at all (a directory) and a model
without the trainer's serving signature are refused before anything is classified.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from trainer import storage
from trainer.contract import LABELS_FILE
from trainer.errors import ConfigError, DataError, tf_error_summary

BATCH = 32


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first
    probabilities: np.ndarray


@dataclass
class Failure:
    path: str
    reason: str


def saved_model_dir(path: str) -> str:
    """Accept the run directory (output.dir), its export directory or the SavedModel itself."""
    for candidate in (storage.join(path, "export", "saved_model"), storage.join(path, "saved_model"), path):
        if storage.exists(storage.join(candidate, "saved_model.pb")):
            return candidate
    raise ConfigError(
        f"no SavedModel at {path}; pass the run's output.dir or its export directory (<output.dir>/export)"
    )


def read_labels(saved_model: str, num_classes: int) -> list[str]:
    """Class names from ``labels.txt`` beside the SavedModel; indices when it is missing."""
    path = storage.join(saved_model.rstrip("/").rsplit("/", 1)[0], LABELS_FILE)
    if not storage.exists(path):
        return [str(i) for i in range(num_classes)]
    return storage.read_text(path).splitlines()


def check_image_arguments(images: Iterable[str]) -> None:
    """Refuse arguments that are directories: a command-line mistake, before the model loads."""
    folders = [path for path in images if not storage.is_remote(path) and os.path.isdir(path)]
    if folders:
        raise ConfigError(
            f"{', '.join(folders)} {'is a directory' if len(folders) == 1 else 'are directories'}, not an image; "
            f"pass image files (e.g. {folders[0].rstrip('/')}/*.jpg)"
        )


def predict_files(
    model_path: str, images: list[str], top_k: int = 3, failures: list[Failure] | None = None
) -> list[Prediction]:
    """Predictions for the images that could be classified.

    The images that could not be are appended to ``failures`` with the reason; without that
    list, any such image is a DataError naming them all (after every image was tried).
    """
    from trainer.export import load_serving

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    check_image_arguments(images)
    saved_model = saved_model_dir(model_path)
    serve = load_serving(saved_model)
    labels: list[str] | None = None
    results: list[Prediction] = []
    failed: list[Failure] = [] if failures is None else failures
    for start in range(0, len(images), BATCH):
        readable = []
        for path in images[start : start + BATCH]:
            data = _read_image(path, failed)
            if data is not None:
                readable.append((path, data))
        for path, probs in _classify(serve, readable, failed):
            labels = labels or read_labels(saved_model, probs.shape[-1])
            order = np.argsort(-probs)[:top_k]
            results.append(Prediction(path, [(labels[i], float(probs[i])) for i in order], probs))
    position = {path: i for i, path in reversed(list(enumerate(images)))}
    failed.sort(key=lambda failure: position[failure.path])  # reads fail before decodes: back to argument order
    if failed and failures is None:
        raise failures_error(failed, len(results))
    return results


def _read_image(path: str, failures: list[Failure]) -> bytes | None:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        failures.append(Failure(path, "no such file"))
    except OSError as err:  # e.g. no permission
        failures.append(Failure(path, err.strerror or type(err).__name__))
    return None


def _classify(serve: Callable, batch: list[tuple[str, bytes]], failures: list[Failure]) -> list:
    """(path, probabilities) of the batch; when the batch fails to decode, image by image."""
    import tensorflow as tf

    if not batch:
        return []
    try:
        probabilities = serve(image_bytes=tf.constant([data for _, data in batch]))["probabilities"].numpy()
        return [(path, probs) for (path, _), probs in zip(batch, probabilities, strict=True)]
    except tf.errors.InvalidArgumentError as err:
        if len(batch) == 1:
            failures.append(Failure(batch[0][0], tf_error_summary(str(err)).rstrip(".")))
            return []
    return [result for one in batch for result in _classify(serve, [one], failures)]


def failures_error(failures: list[Failure], classified: int) -> DataError:
    """One line naming every image that could not be classified, and why."""
    total = classified + len(failures)
    named = "; ".join(f"{f.path} ({f.reason})" for f in failures)
    return DataError(
        f"{len(failures)} of {total} image(s) could not be classified: {named}; pass readable JPEG or PNG files"
        + (" (the others are classified above)" if classified else "")
    )


def predict_command(model_path: str, images: list[str], top_k: int, as_json: bool) -> None:
    failures: list[Failure] = []
    predictions = predict_files(model_path, images, top_k, failures)
    for prediction in predictions:
        if as_json:
            print(
                json.dumps(
                    {
                        "image": prediction.path,
                        "top": [{"label": label, "probability": round(p, 6)} for label, p in prediction.top],
                    }
                )
            )
        else:
            ranked = ", ".join(f"{label} {p:.1%}" for label, p in prediction.top)
            print(f"{prediction.path}: {ranked}")
    if failures:
        raise failures_error(failures, len(predictions))
