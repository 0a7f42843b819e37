"""Bad inputs through the real CLI, as a careless user or a broken cluster gives them.

Every case runs `python -m trainer ...` in its own process and must end with the documented exit
code (trainer.contract.ExitCode), no traceback, and exactly one `error:` line on stderr that names
what is wrong (a file, a setting, a shard). The other tests of a feature assert the details; this
table is the audit that keeps all of them honest together (the issue notes quote its output).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from tests.support.training import TINY_RUN, cut_after_records, make_tiny_dataset, set_args
from trainer.contract import ExitCode

pytestmark = pytest.mark.slow

CONFIG, DATA, TRANSIENT = ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR, ExitCode.TRANSIENT


@dataclass
class World:
    """What the cases start from: images, a prepared dataset, a finished run with its export."""

    root: pathlib.Path
    images: pathlib.Path
    dataset: pathlib.Path
    run: pathlib.Path

    def copy_of_dataset(self, name: str) -> pathlib.Path:
        target = self.root / name
        shutil.copytree(self.dataset, target)
        return target

    def file(self, name: str, data: bytes | str = b"") -> pathlib.Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def train(self, *settings: str, dataset: pathlib.Path | None = None, output: pathlib.Path | None = None):
        output = output or self.root / f"out-{time.monotonic_ns()}"
        base = [*TINY_RUN, f"data.dataset={dataset or self.dataset}", f"output.dir={output}"]
        return ["train", *set_args(*base, *settings)]


@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    code: int
    names: Callable[[World], str] | str = ""  # what the error line must name
    env: dict[str, str] = field(default_factory=dict)


def _yaml(world: World, text: str) -> list[str]:
    return ["--config", str(world.file(f"cfg-{abs(hash(text))}.yaml", text))]


def _truncated_shard(world: World) -> pathlib.Path:
    dataset = world.copy_of_dataset("cut")
    cut_after_records(sorted(dataset.glob("train-*.tfrecord"))[0], 2)
    return dataset


def _dataset_with(world: World, name: str, change: Callable[[pathlib.Path], None]) -> pathlib.Path:
    dataset = world.copy_of_dataset(name)
    change(dataset)
    return dataset


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[pathlib.Path], None]:
    def change(dataset: pathlib.Path) -> None:
        manifest = json.loads((dataset / "manifest.json").read_text())
        edit(manifest)
        (dataset / "manifest.json").write_text(json.dumps(manifest))

    return change


CASES = [
    # --------------------------------------------------------------- command line and configuration
    Case("unknown command", lambda w: ["trian"], CONFIG, "trian"),
    Case("missing argument", lambda w: ["prepare", str(w.images)], CONFIG, "dataset"),
    Case("unknown option", lambda w: ["train", "--wokers", "2"], CONFIG, "--wokers"),
    Case("--set without =", lambda w: ["config", "--set", "train.epochs"], CONFIG, "train.epochs"),
    Case(
        "unknown setting (typo)", lambda w: ["config", "--set", "train.batch_sise_per_replica=8"], CONFIG, "batch_size"
    ),
    Case("wrong type", lambda w: ["config", "--set", "train.batch_size_per_replica=many"], CONFIG, "batch_size"),
    Case("out of range", lambda w: ["config", "--set", "train.batch_size_per_replica=0"], CONFIG, "batch_size"),
    Case(
        "learning rate inf",
        lambda w: ["config", "--set", "phases.fine_tuning.optimizer.learning_rate=.inf"],
        CONFIG,
        "learning_rate",
    ),
    Case(
        "learning rate nan",
        lambda w: ["config", "--set", "phases.fine_tuning.optimizer.learning_rate=.nan"],
        CONFIG,
        "learning_rate",
    ),
    Case("unknown recipe", lambda w: ["config", "--set", "recipe=fast"], CONFIG, "recipe"),
    Case("config file missing", lambda w: ["config", "--config", str(w.root / "nope.yaml")], CONFIG, "nope.yaml"),
    Case("config not YAML", lambda w: ["config", *_yaml(w, "train: [1, 2\n")], CONFIG, "cfg-"),
    Case("config not a mapping", lambda w: ["config", *_yaml(w, "- 1\n- 2\n")], CONFIG, "cfg-"),
    Case(
        "duplicate YAML key",
        lambda w: ["config", *_yaml(w, "train:\n  steps_per_epoch: 1\n  steps_per_epoch: 2\n")],
        CONFIG,
        "steps_per_epoch",
    ),
    Case("data.dataset not set", lambda w: ["train", "--set", f"output.dir={w.root / 'o'}"], CONFIG, "data.dataset"),
    Case("output.dir not set", lambda w: ["train", "--set", f"data.dataset={w.dataset}"], CONFIG, "output.dir"),
    Case("launch 0 workers", lambda w: ["launch", "--workers", "0", *w.train()[1:]], CONFIG, "workers"),
    Case("malformed TF_CONFIG", lambda w: w.train(), CONFIG, "TF_CONFIG", env={"TF_CONFIG": "{not json"}),
    Case(
        "TF_CONFIG index out of range",
        lambda w: w.train(),
        CONFIG,
        "TF_CONFIG",
        env={"TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}})},
    ),
    # --------------------------------------------------------------- prepare
    Case("prepare: source missing", lambda w: ["prepare", str(w.root / "nope"), str(w.root / "d1")], DATA, "nope"),
    Case(
        "prepare: source is a file",
        lambda w: ["prepare", str(w.file("a.txt", "x")), str(w.root / "d2")],
        DATA,
        "a.txt",
    ),
    Case("prepare: one class", lambda w: ["prepare", str(_one_class(w)), str(w.root / "d3")], DATA, "class"),
    Case("prepare: no images", lambda w: ["prepare", str(_empty_classes(w)), str(w.root / "d4")], DATA, "image"),
    Case("prepare: dataset exists", lambda w: ["prepare", str(w.images), str(w.dataset)], CONFIG, "--overwrite"),
    Case(
        "prepare: dataset path is a file",
        lambda w: ["prepare", str(w.images), str(w.file("ds.file", "x"))],
        CONFIG,
        "ds.file",
    ),
    # --------------------------------------------------------------- train: the dataset
    Case("train: dataset missing", lambda w: w.train(dataset=w.root / "nope"), DATA, "nope"),
    Case(
        "train: manifest cut mid-write",
        lambda w: w.train(
            dataset=_dataset_with(w, "m1", lambda d: (d / "manifest.json").write_text('{"schema_version": 1, "class'))
        ),
        DATA,
        "manifest",
    ),
    Case(
        "train: manifest of a newer schema",
        lambda w: w.train(dataset=_dataset_with(w, "m2", _manifest_edit(lambda m: m.update(schema_version=9)))),
        DATA,
        "schema_version",
    ),
    Case(
        "train: manifest counts disagree",
        lambda w: w.train(
            dataset=_dataset_with(w, "m3", _manifest_edit(lambda m: m["counts"]["train"].update({"x": 5})))
        ),
        DATA,
        "records",
    ),
    Case(
        "train: model input above the size prepare scaled the images for",
        lambda w: w.train(
            "data.image_size=48",
            dataset=_dataset_with(
                w, "m4", _manifest_edit(lambda m: m["extra"].update(prepared_for_image_size=32, downscaled_images=5))
            ),
        ),
        CONFIG,
        "prepare.image_size=48",
    ),
    Case(
        "train: shard cut at a record boundary",
        lambda w: w.train(dataset=_truncated_shard(w)),
        DATA,
        "train-00000-of-00004.tfrecord",
    ),
    Case(
        "train: shard missing",
        lambda w: w.train(
            dataset=_dataset_with(w, "s2", lambda d: (d / "validation-00001-of-00004.tfrecord").unlink())
        ),
        DATA,
        "validation-00001",
    ),
    Case(
        "train: fewer shards than workers",
        lambda w: w.train(),
        DATA,
        "shard(s)",
        env={
            "TF_CONFIG": json.dumps(
                {
                    "cluster": {"worker": [f"localhost:{p}" for p in range(23450, 23455)]},
                    "task": {"type": "worker", "index": 0},
                }
            )
        },
    ),
    Case(
        "train: batch larger than the split",
        lambda w: w.train("train.batch_size_per_replica=64", "train.steps_per_epoch=0"),
        DATA,
        "batch",
    ),
    # --------------------------------------------------------------- train: weights and output
    Case("train: weights file missing", lambda w: w.train(f"model.weights={w.root / 'nope.h5'}"), DATA, "nope.h5"),
    Case(
        "train: weights file not HDF5", lambda w: w.train(f"model.weights={w.file('w.h5', 'not hdf5')}"), DATA, "w.h5"
    ),
    Case("train: output is a file", lambda w: w.train(output=w.file("out.file", "x")), CONFIG, "out.file"),
    Case(
        "train: backup for other classes",
        lambda w: w.train(output=_output_with_state(w, ["cat", "dog"])),
        DATA,
        "classes",
    ),
    Case(
        "train: resume at another image size",
        lambda w: w.train("data.image_size=48", output=_interrupted(w)),
        CONFIG,
        "data.image_size",
    ),
    Case(
        "train: resume with another head",
        lambda w: w.train("model.head.dense_units=[8]", output=_interrupted(w)),
        CONFIG,
        "model.head",
    ),
    Case(
        "train: resume with other base weights",
        lambda w: w.train("model.weights=imagenet", output=_interrupted(w)),
        CONFIG,
        "model.weights",
    ),
    Case(
        "train: output held by another live run",
        lambda w: w.train(output=_held_output(w)),
        TRANSIENT,
        "job ml/other-run",
    ),
    # --------------------------------------------------------------- predict and evaluate
    Case("predict: model missing", lambda w: ["predict", str(w.root / "nope"), _an_image(w)], CONFIG, "nope"),
    Case("predict: image missing", lambda w: ["predict", str(w.run), str(w.root / "nope.jpg")], DATA, "nope.jpg"),
    Case(
        "predict: image path is a directory",
        lambda w: ["predict", str(w.run), str(w.images)],
        CONFIG,
        lambda w: str(w.images),
    ),
    Case(
        "predict: not an image",
        lambda w: ["predict", str(w.run), str(w.file("bad.jpg", b"\xff\xd8 not a jpeg"))],
        DATA,
        "bad.jpg",
    ),
    Case(
        "predict: SavedModel without the signature",
        lambda w: ["predict", str(_bare_saved_model(w)), _an_image(w)],
        DATA,
        "serving_default",
    ),
    Case("predict: top-k 0", lambda w: ["predict", str(w.run), _an_image(w), "--top-k", "0"], CONFIG, "top-k"),
    Case(
        "evaluate: run without an export",
        lambda w: ["evaluate", str(w.root / "empty-run"), str(w.dataset)],
        CONFIG,
        "empty-run",
    ),
    Case(
        "evaluate: --output is a file",
        lambda w: ["evaluate", str(w.run), str(w.dataset), "--output", str(w.file("eval.file", "x"))],
        CONFIG,
        "eval.file",
    ),
    # --------------------------------------------------------------- the job runner
    Case("job run: manifests missing", lambda w: ["job", "run", str(w.root / "nope.yaml")], CONFIG, "nope.yaml"),
    Case(
        "job run: malformed YAML",
        lambda w: ["job", "run", str(w.file("job.yaml", "kind: Job\n  spec: [\n"))],
        CONFIG,
        "job.yaml",
    ),
    Case(
        "job run: no Job in the manifests",
        lambda w: ["job", "run", str(w.file("cm.yaml", "kind: ConfigMap\n"))],
        CONFIG,
        "Job",
    ),
]


def _one_class(world: World) -> pathlib.Path:
    source = world.root / "one-class"
    shutil.copytree(next(p for p in world.images.iterdir() if p.is_dir()), source / "only")
    return source


def _empty_classes(world: World) -> pathlib.Path:
    source = world.root / "empty-classes"
    for name in ("a", "b"):
        (source / name).mkdir(parents=True)
        (source / name / "notes.txt").write_text("no images here")
    return source


def _an_image(world: World) -> str:
    return str(next(world.images.rglob("*.jpg")))


def _output_with_state(world: World, classes: list[str]) -> pathlib.Path:
    output = world.root / f"state-{len(classes)}"
    output.mkdir(exist_ok=True)
    (output / "state.json").write_text(json.dumps({"class_names": classes, "phases": {}, "complete": False}))
    return output


def _interrupted(world: World) -> pathlib.Path:
    """A copy of the finished run marked unfinished, with a backup: a resume of it."""
    output = world.root / f"resume-{time.monotonic_ns()}"
    shutil.copytree(world.run, output)
    state = json.loads((output / "state.json").read_text())
    state.update(complete=False, phases={})
    (output / "state.json").write_text(json.dumps(state))
    (output / "backup" / "feature_extraction").mkdir(parents=True)
    return output


def _held_output(world: World) -> pathlib.Path:
    output = world.root / "held"
    output.mkdir(exist_ok=True)
    lease = {
        "owner": "job ml/other-run",
        "host": "pod-0",
        "pid": 1,
        "token": "t",
        "since": "2026-12-03T00:00:00+00:00",
        "renewed_unix": time.time(),
        "expires_after_seconds": 600,
    }
    (output / "owner.json").write_text(json.dumps(lease))
    return output


def _bare_saved_model(world: World) -> pathlib.Path:
    path = world.root / "bare-saved-model"
    if not path.exists():
        code = (
            "import sys, tensorflow as tf\n"
            "m = tf.Module(); m.v = tf.Variable(1.0)\n"
            "tf.saved_model.save(m, sys.argv[1])\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, timeout=120)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    from trainer.data.synthetic import make_demo_images

    images = root / "images"
    make_demo_images(str(images), classes=3, per_class=12, size=40, seed=3)
    dataset = pathlib.Path(make_tiny_dataset(root / "tiny"))
    run = root / "run"
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *World(root, images, dataset, run).train(output=run)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return World(root, images, dataset, run)


#: What may follow a command-line error: the hint where to read the usage.
USAGE_HINT = "usage"


def _after(stderr: str, line: str) -> list[str]:
    """The kinds of the lines after ``line``: "usage" for a usage hint, else the line itself."""
    lines = stderr.splitlines()
    rest = [x for x in lines[lines.index(line) + 1 :] if x.strip()]
    return [USAGE_HINT if "--help" in x or x.startswith("usage:") else x for x in rest][:2]


RESULTS: list[tuple[str, int, int, str]] = []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_ends_with_one_line_and_its_exit_code(world, case):
    argv = case.argv(world)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"} | case.env
    result = subprocess.run(
        [sys.executable, "-m", "trainer", *argv], capture_output=True, text=True, env=env, timeout=110
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    RESULTS.append((case.name, case.code, result.returncode, errors[0] if errors else result.stderr[-300:]))

    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == case.code, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert _after(result.stderr, errors[0]) in ([], [USAGE_HINT]), result.stderr[-3000:]  # the line ends it
    named = case.names(world) if callable(case.names) else case.names
    assert named.lower() in errors[0].lower(), errors[0]


def teardown_module() -> None:
    """The audit table (pytest -s shows it): case, expected and actual exit code, the line."""
    for name, expected, got, line in RESULTS:
        print(f"| {name} | {expected} | {got} | {line.strip()[:160]} |")
