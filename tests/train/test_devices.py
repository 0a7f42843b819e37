"""The code paths of GPU nodes, run for real on CPU (no GPU here): TensorFlow splits the CPU into
logical devices (``runtime.cpu_devices``), runs XLA and both mixed-precision policies.

- MirroredStrategy over 2 devices (the chart's ``workers: 1, gpusPerWorker: 2`` path) under
  mixed_float16 with loss scaling: both phases, evaluation, export; identical replicas; the
  global batch and learning-rate rule count 2 replicas; the served model outputs float32;
- 2 workers x 2 devices (4 replicas) through the chart and the job runner: identical weights on
  every replica of every worker;
- XLA (``runtime.jit_compile``) with mixed_bfloat16 in one process, and XLA over 2 workers;
- a backup taken under mixed precision restores everything: a run stopped by SIGTERM and
  resumed ends with exactly the weights (and loss scale) of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.jobs import NAMESPACE, TINY_TRAINER, Capture, condition_types, needs_namespaces, render
from tests.support.training import TINY_RUN, make_tiny_dataset, set_args
from trainer.contract import ExitCode
from trainer.launch import entrypoint_command

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _train(dataset: str, output: Path, *extra: str, workers: int = 1) -> subprocess.CompletedProcess:
    """`trainer train` (one process) or `trainer launch` (several) of the tiny run."""
    command = ["train"] if workers == 1 else ["launch", "--workers", str(workers)]
    args = set_args(*TINY_RUN, f"data.dataset={dataset}", f"output.dir={output}", *extra)
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    return subprocess.run(
        [*entrypoint_command(), *command, *args], capture_output=True, text=True, env=env, timeout=240
    )


def _summary(output: Path) -> dict:
    return json.loads((output / "summary.json").read_text())


def _assert_complete_and_exported(result: subprocess.CompletedProcess, output: Path) -> dict:
    assert result.returncode == ExitCode.OK, (result.stdout + result.stderr)[-4000:]
    summary = _summary(output)
    assert set(summary["phases"]) == {"feature_extraction", "fine_tuning"}
    assert {"validation", "test"} <= set(summary["evaluation"])
    assert (output / "export" / "saved_model" / "saved_model.pb").exists()
    return summary


@pytest.mark.timeout(300)
def test_mirrored_strategy_over_two_devices_under_mixed_float16_trains_evaluates_and_exports(tiny_dataset, tmp_path):
    output = tmp_path / "run"

    result = _train(tiny_dataset, output, "runtime.cpu_devices=2", "runtime.mixed_precision=mixed_float16")

    summary = _assert_complete_and_exported(result, output)
    distribution = summary["distribution"]
    assert (distribution["strategy"], distribution["replicas"], distribution["local_devices"]) == ("mirrored", 2, 2)
    assert distribution["precision_policy"] == "mixed_float16"
    assert distribution["global_batch"] == 2 * 4  # batch_size_per_replica=4 on each of 2 replicas
    # Each device's copy of every weight is the same, and the one the fingerprint read.
    assert distribution["replica_fingerprints"] == [summary["weights_fingerprint"]] * 2
    # The learning rate the optimizer used is the one scaled to the 2-replica global batch.
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    for phase in summary["plan"]["phases"]:
        expected = phase["learning_rate_given"] * distribution["global_batch"] / phase["reference_batch"]
        used = {row["learning_rate"] for row in rows if row["phase"] == phase["name"]}
        assert used and all(lr == pytest.approx(expected, rel=1e-5) for lr in used), (phase, used)
    # Under mixed precision the served probabilities stay float32.
    import tensorflow as tf

    from trainer.export import load_serving

    image = next((Path(tiny_dataset).parent / "images").rglob("*.jpg")).read_bytes()
    serve = load_serving(str(output / "export" / "saved_model"))
    probabilities = serve(image_bytes=tf.constant([image]))["probabilities"]
    assert probabilities.dtype.name == "float32" and probabilities.shape == (1, 3)


@needs_namespaces
@pytest.mark.timeout(400)
def test_two_workers_with_two_devices_each_train_four_identical_replicas(tmp_path):
    from trainer.jobrunner import JobRunner

    dataset = make_tiny_dataset(tmp_path)
    output = tmp_path / "run"
    trainer = json.loads(json.dumps(TINY_TRAINER))
    trainer["runtime"]["cpu_devices"] = 2
    text = render(tmp_path, {"workers": 2, "dataset": dataset, "output": str(output), "trainer": trainer})
    sink = Capture()
    with JobRunner(text, namespace=NAMESPACE, sink=sink) as runner:
        status = runner.run(timeout=360)
        fingerprints = [re.findall(r"weights fingerprint (\w+)", runner.pod_log(i)) for i in range(2)]

    assert condition_types(status)[-1] == ("Complete", "CompletionsReached"), sink.text[-5000:]
    summary = _summary(output)
    distribution = summary["distribution"]
    assert (distribution["workers"], distribution["replicas"], distribution["local_devices"]) == (2, 4, 2)
    assert distribution["global_batch"] == 4 * 4
    assert fingerprints[0] == fingerprints[1] == [summary["weights_fingerprint"]], fingerprints
    assert distribution["replica_fingerprints"] == [summary["weights_fingerprint"]] * 2


@pytest.mark.timeout(300)
def test_xla_with_mixed_bfloat16_trains_and_exports_in_one_process(tiny_dataset, tmp_path):
    output = tmp_path / "run"

    result = _train(tiny_dataset, output, "runtime.jit_compile=true", "runtime.mixed_precision=mixed_bfloat16")

    distribution = _assert_complete_and_exported(result, output)["distribution"]
    assert distribution["jit_compile"] is True and distribution["precision_policy"] == "mixed_bfloat16"


@pytest.mark.timeout(300)
def test_xla_trains_and_exports_over_two_workers(tiny_dataset, tmp_path):
    output = tmp_path / "run"

    result = _train(tiny_dataset, output, "runtime.jit_compile=true", workers=2)

    summary = _assert_complete_and_exported(result, output)
    assert (summary["distribution"]["strategy"], summary["distribution"]["replicas"]) == ("multi_worker", 2)
    logged = re.findall(r"weights fingerprint (\w+) \(worker (\d)\)", result.stdout + result.stderr)
    by_worker = {worker: fingerprint for fingerprint, worker in logged}
    assert by_worker == {"0": summary["weights_fingerprint"], "1": summary["weights_fingerprint"]}, by_worker


# --------------------------------------------------------------------------- backups under mixed precision

_RESUME_SCRIPT = r"""
import hashlib, json, os, signal, sys
import numpy as np, tensorflow as tf, tf_keras as keras
from trainer.config import ModelConfig
from trainer.errors import Preempted
from trainer.model import build_model
from trainer.train.backup import PhaseBackup
from trainer.train.callbacks import Backups, StopRequest
from trainer.train.phases import fit_from_position

policy, backup_dir, sigterm_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
tf.config.experimental.enable_op_determinism()
keras.mixed_precision.set_global_policy(policy)
model = build_model(3, 32, ModelConfig(weights="none", head={"dense_units": [8], "dropout": 0.0}), seed=3)
model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy")
# No dropout: its random stream restarts with the process, so only a run without randomness can match
# bit for bit. One fixed batch: every step sees the same data, before or after a restart.
rng = np.random.default_rng(0)
batch = (rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"), np.eye(3, dtype="float32")[[0, 1, 2, 0]])
data = tf.data.Dataset.from_tensors(batch).repeat()


class SigtermAt(keras.callbacks.Callback):
    steps = 0

    def on_train_batch_end(self, batch, logs=None):
        SigtermAt.steps += 1
        if SigtermAt.steps == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


backup = PhaseBackup(backup_dir, model, keep=2, is_chief=True)
position = backup.restore()
stop = StopRequest(tf.distribute.get_strategy(), multi_worker=False)
backups = Backups(backup, 3, 4, position.phase_steps if position else 0, stop)
stop.install()
try:
    fit_from_position(model, data, 3, 4, position, [SigtermAt(), backups], backups)
    code = 0
except Preempted:
    code = 76
finally:
    stop.uninstall()
opt = model.optimizer
scale = [float(opt.loss_scale.numpy()), int(opt.dynamic_counter.numpy())] if hasattr(opt, "loss_scale") else None
weights = b"".join(np.ascontiguousarray(w).tobytes() for w in model.get_weights())
digest = hashlib.sha256(weights).hexdigest()
print(json.dumps({"weights": digest, "loss_scale": scale, "iterations": int(opt.iterations.numpy())}))
sys.exit(code)
"""


def _phase(policy: str, backup_dir: Path, sigterm_at: int = 0) -> tuple[int, dict]:
    """Run the resumable phase (3 epochs x 4 steps, a backup every 3 steps) in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, policy, str(backup_dir), str(sigterm_at)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode in (0, 76), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_a_run_stopped_and_resumed_under_mixed_precision_ends_as_an_uninterrupted_one(tmp_path, policy):
    _, uninterrupted = _phase(policy, tmp_path / "uninterrupted")

    code, stopped = _phase(policy, tmp_path / "resumed", sigterm_at=6)  # mid-epoch 2: backed up at once
    assert code == 76 and stopped["iterations"] == 6
    _, resumed = _phase(policy, tmp_path / "resumed")

    assert resumed == uninterrupted  # the same weights, optimizer steps and (float16) loss scale
    assert uninterrupted["iterations"] == 12
    if policy == "mixed_float16":
        assert uninterrupted["loss_scale"] is not None and uninterrupted["loss_scale"][1] == 12  # steps since a change
