"""Classify image files with an exported model (the SavedModel's serving signature)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from trainer import storage
from trainer.contract import LABELS_FILE
from trainer.errors import ConfigError, DataError

BATCH = 32


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first
    probabilities: np.ndarray


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


def predict_files(model_path: str, images: list[str], top_k: int = 3) -> list[Prediction]:
    import tensorflow as tf

    from trainer.export import load_serving

    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    saved_model = saved_model_dir(model_path)
    serve = load_serving(saved_model)
    labels = None
    results: list[Prediction] = []
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        encoded = [_read_image(path) for path in batch]
        try:
            outputs = serve(image_bytes=tf.constant(encoded))
        except tf.errors.InvalidArgumentError as err:
            raise DataError(
                f"cannot decode one of {batch} ({str(err).splitlines()[0]}); pass JPEG or PNG files"
            ) from None
        probabilities = outputs["probabilities"].numpy()
        labels = labels or read_labels(saved_model, probabilities.shape[-1])
        for path, probs in zip(batch, probabilities, strict=True):
            order = np.argsort(-probs)[:top_k]
            results.append(Prediction(path, [(labels[i], float(probs[i])) for i in order], probs))
    return results


def _read_image(path: str) -> bytes:
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist; check the path") from None


def predict_command(model_path: str, images: list[str], top_k: int, as_json: bool) -> None:
    for prediction in predict_files(model_path, images, top_k):
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
