"""The embedded demo: generated images -> prepare -> 2-worker training -> export -> predict.

Runs on a laptop-class CPU in a few minutes with no download and no cloud account:
small generated images of visually distinct classes, 32x32 model input, VGG16 with
random initial weights (ImageNet weights need a download; see README), both phases.
"""

from __future__ import annotations

import json
import os
import time

from trainer import config as config_lib
from trainer.contract import LOCAL_LISTEN_ADDRESS, ExitCode
from trainer.launch import launch_local
from trainer.layout import RunLayout

#: The demo's training settings, in the same --set syntax a user would type.
DEMO_SETTINGS = [
    "recipe=transfer",  # both phases, as a pretrained run has them; its generated shapes need no more
    "model.weights=none",
    "model.head.dense_units=[64]",
    "model.head.dropout=0.2",
    "data.image_size=32",
    "data.shuffle_buffer=256",
    "data.augment.crop_area_min=0.6",
    "train.batch_size_per_replica=16",
    "train.backup_every_steps=5",
    "phases.feature_extraction.epochs=6",
    "phases.feature_extraction.optimizer.learning_rate=0.01",
    "phases.fine_tuning.epochs=4",
    "phases.fine_tuning.optimizer.learning_rate=0.003",
    "phases.fine_tuning.schedule.warmup_epochs=1",
    "prepare.validation_fraction=0.2",
    "prepare.test_fraction=0.1",
    "prepare.min_shards=4",
    "runtime.verbose=0",
]
DEMO_CLASSES = 4
DEMO_IMAGES_PER_CLASS = 80
DEMO_IMAGE_SIZE = 64


def run_demo(workdir: str, workers: int = 2) -> int:
    from trainer.data.prepare import prepare_dataset
    from trainer.data.synthetic import make_demo_images

    started = time.perf_counter()
    workdir = os.path.abspath(workdir)
    images, dataset, output = (os.path.join(workdir, d) for d in ("images", "dataset", "run"))
    # The metrics endpoints on this machine only, as `trainer launch` serves them (docs/operations.md, "Trust model").
    local = f"monitoring.address={LOCAL_LISTEN_ADDRESS}"
    settings = [*DEMO_SETTINGS, f"data.dataset={dataset}", f"output.dir={output}", local]
    cfg = config_lib.load_config(None, settings)

    _say(f"1/4 generating {DEMO_CLASSES} classes x {DEMO_IMAGES_PER_CLASS} images in {images}")
    classes = make_demo_images(
        images, classes=DEMO_CLASSES, per_class=DEMO_IMAGES_PER_CLASS, size=DEMO_IMAGE_SIZE, seed=0
    )
    _say(f"2/4 preparing TFRecord shards in {dataset}")
    report = prepare_dataset(images, dataset, cfg.prepare, overwrite=True)
    for line in report.summary_lines():
        print("    " + line)
    _say(f"3/4 training with {workers} local workers (MultiWorkerMirroredStrategy), both phases")
    code = launch_local(workers, ["train", *config_lib.set_args(*settings)])
    if code != ExitCode.OK:
        _say(f"training failed with exit code {code}")
        return code
    layout = RunLayout(output)
    _say("4/4 predicting a few images with the exported model")
    from trainer.predict import predict_files

    samples = [os.path.join(images, name, sorted(os.listdir(os.path.join(images, name)))[0]) for name in classes]
    for prediction in predict_files(layout.export, samples, top_k=2):
        ranked = ", ".join(f"{label} {p:.1%}" for label, p in prediction.top)
        print(f"    {os.path.relpath(prediction.path, workdir)}: {ranked}")
    _report(layout, dataset, time.perf_counter() - started)
    return ExitCode.OK


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _report(layout: RunLayout, dataset: str, seconds: float) -> None:
    with open(layout.summary) as fh:
        summary = json.load(fh)
    evaluation = summary["evaluation"]
    print()
    print(f"demo finished in {seconds:.0f} s")
    for split, metrics in evaluation.items():
        print(f"  {split} accuracy: {metrics['accuracy']:.3f} on {metrics['images']} images")
    report = summary.get("evaluation_report") or {}
    if report.get("json"):
        from trainer.report import table_lines

        with open(report["json"]) as fh:
            figures = json.load(fh)
        print()
        for line in table_lines(figures, report["split"]):
            print(f"  {line}")
        print()
        print(f"  evaluation:    {report['json']}")
        if report.get("confusion_matrix"):
            print(f"  confusion:     {report['confusion_matrix']}")
        print(f"  re-evaluate:   trainer evaluate {layout.root} {dataset} --split {report['split']}")
    print(f"  run summary:   {layout.summary}")
    print(f"  metrics log:   {layout.metrics_log}")
    if os.path.exists(layout.curves):
        print(f"  curves (PNG):  {layout.curves}")
    print(f"  TensorBoard:   tensorboard --logdir {layout.tensorboard}")
    print(f"  SavedModel:    {layout.saved_model}")
    print(f"  Keras model:   {layout.keras_model}")
    print(f"  predict:       trainer predict {layout.export} IMAGE...")
