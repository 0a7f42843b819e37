"""The notebook recipe this product replaces, as the notebook wrote it: the baseline of the
benchmark's time-to-accuracy figure.

    ImageDataGenerator (VGG16 preprocessing, rotation/shift/shear/zoom/flip) -> flow_from_directory
    VGG16(include_top=False), base.layers[:-5] frozen, Flatten -> Dense(256, relu) -> Dropout(0.5)
    -> Dense(classes, softmax); Adam(1e-4); model.fit(20 epochs, EarlyStopping(val_loss, 3,
    restore_best_weights)); model.evaluate on the test folder.

The notebook wrote ``target_size=(224, 224)``; here it runs at the model input the product uses
for the same images (``IMAGE_SIZE`` in trainer.bench.accuracy, 32 for the 32 px digits), so the
two differ in recipe only: at 224 this model trains at 2.2 images/s on 2 AVX2 cores (measured),
about 3.5 hours for its 20 epochs of the digits, which this machine cannot spend on a benchmark.

The head, optimizer, freezing and early stopping come from ``trainer.config.RECIPES["notebook"]``
(what ``recipe=notebook`` sets), so the two cannot drift. The base starts from random weights
(``weights=None``) like the product's runs here: ImageNet weights need a download.

    python -m trainer.bench.notebook IMAGE_ROOT IMAGE_SIZE RESULT_JSON [EPOCHS]
"""

from __future__ import annotations

import json
import os
import sys
import time

#: The notebook's augmentation, which the product's pipeline has no exact equivalent of.
AUGMENTATION = {
    "rotation_range": 20,
    "width_shift_range": 0.2,
    "height_shift_range": 0.2,
    "shear_range": 0.2,
    "zoom_range": 0.2,
    "horizontal_flip": True,
}
BATCH = 32


def notebook_settings() -> dict:
    from trainer.config import RECIPES

    settings = {key: value for key, (value, _) in RECIPES["notebook"][1].items()}
    return {
        "dense_units": settings["model.head.dense_units"][0],
        "activation": settings["model.head.activation"],
        "dropout": settings["model.head.dropout"],
        "learning_rate": settings["phases.fine_tuning.optimizer.learning_rate"],
        "epochs": settings["phases.fine_tuning.epochs"],
        "patience": settings["phases.fine_tuning.early_stopping_patience"],
        "monitor": settings["train.monitor"],
        "trainable_layers": 5,  # base.layers[:-5] frozen: block5's three convolutions and its pooling train
    }


def run_notebook(image_root: str, image_size: int, epochs: int | None = None, seed: int = 0) -> dict:
    """Train and test the notebook's model on ``image_root/{train,validation,test}``; figures and seconds."""
    import tensorflow as tf
    import tf_keras as keras
    from tf_keras.applications.vgg16 import VGG16, preprocess_input
    from tf_keras.preprocessing.image import ImageDataGenerator

    started = time.perf_counter()
    recipe = notebook_settings()
    epochs = epochs or recipe["epochs"]
    tf.keras.utils.set_random_seed(seed)
    augmenting = ImageDataGenerator(preprocessing_function=preprocess_input, **AUGMENTATION)
    plain = ImageDataGenerator(preprocessing_function=preprocess_input)

    def flow(generator, split: str, shuffle: bool):
        return generator.flow_from_directory(
            os.path.join(image_root, split), target_size=(image_size, image_size), batch_size=BATCH,
            class_mode="categorical", shuffle=shuffle, seed=seed,
        )  # fmt: skip

    train, validation, test = (
        flow(augmenting, "train", True),
        flow(plain, "validation", False),
        flow(plain, "test", False),
    )
    base = VGG16(weights=None, include_top=False, input_shape=(image_size, image_size, 3))
    for layer in base.layers[: -recipe["trainable_layers"]]:
        layer.trainable = False
    model = keras.Sequential(
        [
            base,
            keras.layers.Flatten(),
            keras.layers.Dense(recipe["dense_units"], activation=recipe["activation"]),
            keras.layers.Dropout(recipe["dropout"]),
            keras.layers.Dense(train.num_classes, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=recipe["learning_rate"]),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    early = keras.callbacks.EarlyStopping(
        monitor=recipe["monitor"], patience=recipe["patience"], restore_best_weights=True
    )
    fit_started = time.perf_counter()
    history = model.fit(train, epochs=epochs, validation_data=validation, callbacks=[early], verbose=2)
    fit_seconds = time.perf_counter() - fit_started
    test_loss, test_accuracy = model.evaluate(test, verbose=0)
    return {
        "recipe": recipe,
        "augmentation": AUGMENTATION,
        "epochs_run": len(history.history["loss"]),
        "fit_seconds": round(fit_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "test_accuracy": round(float(test_accuracy), 4),
        "test_loss": round(float(test_loss), 4),
        "test_images": test.samples,
    }


def main(argv: list[str]) -> int:
    image_root, size, result_path = argv[0], int(argv[1]), argv[2]
    epochs = int(argv[3]) if len(argv) > 3 else None
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    result = run_notebook(image_root, size, epochs)
    with open(result_path, "w") as fh:
        json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
