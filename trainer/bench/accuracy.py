"""Time to accuracy on real data: the product's default run against the notebook recipe it
replaces, on the same real images, the same cores, one after the other.

The data is scikit-learn's scanned digits (``trainer.bench.realdata``), written as a folder of
32x32 PNGs split into train/validation/test. Each side is timed as a user would wait for it,
wall clock from command start to the test figure:
- the product: ``trainer prepare`` then ``trainer train`` (one worker, all cores) with
  ``model.weights=none`` and the model input `prepare` suggests for these images, every other
  setting at its default; its test accuracy is the run's evaluation report;
- the notebook (``trainer.bench.notebook``): ImageDataGenerator + ``model.fit`` as written, at
  the same model input, its test accuracy from ``model.evaluate`` on the test folder.
The ratio is the notebook's seconds over the product's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

from trainer.bench.realdata import write_digits
from trainer.config import set_args
from trainer.contract import Env
from trainer.launch import entrypoint_command
from trainer.supervisor import Child

IMAGE_SIZE = 32  # what `trainer prepare` suggests for the 32 px digits (trainer.data.stats)
QUICK_PER_CLASS = 8


def time_to_accuracy(root: str, quick: bool, timeout: float, say: Callable[[str], None]) -> dict:
    images, dataset, output = (os.path.join(root, name) for name in ("digits", "digits-dataset", "digits-run"))
    counts = write_digits(images, per_class=QUICK_PER_CLASS if quick else None)
    epochs = ["phases.fine_tuning.epochs=1"] if quick else []
    say(f"bench: time to accuracy, the product's default run on {sum(counts.values())} scanned digits")
    product_started, product_wall_start = time.perf_counter(), time.time()
    prepare_seconds = run_step([*entrypoint_command(), "prepare", images, dataset], root, "digits-prepare", timeout)
    settings = ["model.weights=none", f"data.image_size={IMAGE_SIZE}", f"data.dataset={dataset}",
                f"output.dir={output}", "runtime.verbose=0", *epochs]  # fmt: skip
    train_seconds = run_step([*entrypoint_command(), "train", *set_args(*settings)], root, "digits-train", timeout)
    product_seconds = time.perf_counter() - product_started
    with open(os.path.join(output, "summary.json")) as fh:
        summary = json.load(fh)
    say("bench: time to accuracy, the notebook recipe on the same images")
    result_path = os.path.join(root, "notebook.result.json")
    notebook_command = [sys.executable, "-m", "trainer.bench.notebook", images, str(IMAGE_SIZE), result_path]
    notebook_seconds = run_step([*notebook_command, *(["1"] if quick else [])], root, "notebook", timeout)
    with open(result_path) as fh:
        notebook = json.load(fh)
    product_accuracy = summary["evaluation"]["test"]["accuracy"]
    passed = _first_epoch_at(output, notebook["test_accuracy"])
    return {
        "dataset": {"name": "scikit-learn load_digits", "images": counts, "image_size": IMAGE_SIZE},
        "product": {
            "settings": settings[:2],
            "recipe": summary["plan"]["recipe"],
            "epochs_run": sum(p["epochs_run"] for p in summary["phases"].values()),
            "test_accuracy": round(product_accuracy, 4),
            "prepare_seconds": round(prepare_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "seconds": round(product_seconds, 1),
            # When the product's validation accuracy first reached the notebook's final test accuracy.
            "epoch_reaching_notebook_accuracy": passed["epoch"] if passed else None,
            "seconds_to_notebook_accuracy": round(passed["time"] - product_wall_start, 1) if passed else None,
        },
        "notebook": {**notebook, "seconds": round(notebook_seconds, 1)},
        "time_ratio": round(notebook_seconds / product_seconds, 2),
        "accuracy_difference": round(product_accuracy - notebook["test_accuracy"], 4),
    }


def _first_epoch_at(output: str, accuracy: float) -> dict | None:
    """The product's first epoch row (metrics.jsonl) whose validation accuracy is at least ``accuracy``."""
    with open(os.path.join(output, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return next((row for row in rows if row.get("val_accuracy", 0.0) >= accuracy), None)


def run_step(command: list[str], root: str, name: str, timeout: float) -> float:
    """Run ``command`` to completion, its output in ``root/<name>.log``; wall seconds."""
    from trainer.bench.suite import step_failed  # suite imports this module

    log_path = os.path.join(root, f"{name}.log")
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env[Env.METRICS_PORT.value] = "0"  # any free port: nothing else may hold the default
    started = time.perf_counter()
    child = Child(command, env=env, log_path=log_path)
    code = child.wait(timeout)  # killed past the timeout
    child.join_output()
    if child.timed_out or code != 0:
        raise step_failed(name, "timeout" if child.timed_out else f"exit {code}", log_path)
    return time.perf_counter() - started
