"""A whole training run: both phases, final evaluation, export and the run summary.

Order of work (every worker runs it; only the chief writes final artifacts):
manifest -> checks (weights file, existing backup) -> model -> phases (skipping
completed ones, resuming an interrupted one) -> evaluation (validation, then test)
-> export (chief) -> summary (chief) -> final barrier so workers leave together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras

import trainer
from trainer import config as config_lib
from trainer import export as export_lib
from trainer import metrics as metrics_lib
from trainer import model as model_lib
from trainer import report as report_lib
from trainer import storage
from trainer.cluster import ClusterSpec
from trainer.config import Config
from trainer.contract import Env
from trainer.data import pipeline, scale
from trainer.data.manifest import Manifest, check_shard_sizes, read_manifest
from trainer.data.stats import ImageStats
from trainer.errors import ConfigError, DataError, TransientError
from trainer.export import export_model
from trainer.layout import RunLayout
from trainer.strategy import Distribution, sum_over_workers
from trainer.train import evaluation, feature_cache
from trainer.train import lease as lease_lib
from trainer.train import plan as plan_lib
from trainer.train.phases import compile_for_phase, plan_phase, run_phase
from trainer.train.state import RunState, check_resume, load_state, save_state
from trainer.train.telemetry import RunTelemetry, count_attempt

log = logging.getLogger(__name__)


def steps_per_epoch(train_images: int, global_batch: int, override: int = 0) -> int:
    if override:
        return override
    steps = train_images // global_batch
    if steps == 0:
        raise DataError(
            f"the training split has {train_images} images, fewer than one global batch of {global_batch}; "
            "lower train.batch_size_per_replica or add images"
        )
    return steps


def weights_fingerprint(model: keras.Model) -> str:
    """SHA-256 over every weight: equal on all workers of a healthy synchronous run."""
    digest = hashlib.sha256()
    for array in model.get_weights():
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def replica_fingerprints(model: keras.Model, strategy) -> list[str]:
    """``weights_fingerprint`` of each of this worker's replicas (each device holds its own copy of
    every mirrored variable): all equal in a healthy run, whatever the strategy."""
    local = [strategy.experimental_local_results(v) for v in model.weights]
    copies = max(len(values) for values in local)
    digests = [hashlib.sha256() for _ in range(copies)]
    for values in local:
        for index, digest in enumerate(digests):
            array = values[index if len(values) > 1 else 0].numpy()
            digest.update(np.ascontiguousarray(array).tobytes())
    return [d.hexdigest()[:16] for d in digests]


@dataclass
class Preflight:
    """What the checks before the strategy found: the run's inputs, validated."""

    layout: RunLayout
    manifest: Manifest
    state: RunState
    weights_file: model_lib.WeightsFile | None
    train_files: list[str]  # every training shard, in order
    lease: lease_lib.Lease | None = None  # the chief's hold on output.dir (trainer.train.lease)

    def ensure_owner(self) -> None:
        """Before the chief writes into the output: stop if another run took it over."""
        if self.lease is not None:
            self.lease.ensure_held()

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()


def preflight(cfg: Config, cluster: ClusterSpec) -> Preflight:
    """Every check that needs no TensorFlow runtime, run before the strategy is built.

    Bad input then fails in seconds with a clear message, instead of after the workers
    have waited for each other to form a cluster.
    """
    if not cfg.output.dir:
        raise ConfigError("output.dir is not set; pass --set output.dir=DIR (local path or gs://bucket/prefix)")
    layout = RunLayout(cfg.output.dir)
    manifest = read_manifest(cfg.data.dataset)
    check_shard_sizes(cfg.data.dataset, manifest)
    scale.check_image_size(manifest.extra, cfg.data.image_size)
    train_files = pipeline.shard_paths(cfg.data.dataset, manifest, "train")
    pipeline.shards_for_worker(train_files, cluster.num_workers, cluster.worker_index)
    weights_file = _checked_weights_file(cfg, manifest)
    probe_writable(layout.root, cluster.worker_index)
    lease = _hold_output(cfg, layout, cluster)  # before reading the state another run may still write
    try:
        state = load_state(layout.state, manifest.class_names)
        _check_resume(cfg, layout, state, cluster.is_chief)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return Preflight(layout, manifest, state, weights_file, train_files, lease)


def _check_resume(cfg: Config, layout: RunLayout, state: RunState, is_chief: bool) -> None:
    """A run that trained refuses settings its backup cannot survive; the chief records a new run's settings."""
    settings = config_lib.to_dict(cfg)
    trained = bool(state.phases) or storage.exists(storage.join(layout.root, "backup"))
    if trained:
        changes = check_resume(state, settings, layout.root)
        if changes and is_chief:
            log.info(
                "resuming with settings changed since the run started (its backup stays valid): %s", "; ".join(changes)
            )
    if is_chief and not (trained and state.settings):
        state.settings = settings
        save_state(layout.state, state)


def _hold_output(cfg: Config, layout: RunLayout, cluster: ClusterSpec) -> lease_lib.Lease | None:
    """The chief takes the run's lease; the other workers check no other live run holds it."""
    me = lease_lib.this_holder()
    if not cluster.is_chief:
        lease_lib.wait_until_free(layout.root, me, cfg.output.lease_wait_seconds)
        return None
    lease = lease_lib.Lease.acquire(layout.root, me, cfg.output.lease_seconds, cfg.output.lease_wait_seconds)
    lease.start_renewing()
    return lease


def probe_writable(root: str, worker_index: int) -> None:
    """Write and delete a small object under ``root``: fails now, not after hours of training."""
    probe = storage.join(root, f".probe-worker-{worker_index}-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_text(probe, "probe\n")
        storage.remove_tree(probe)
    except PermissionError:  # other file systems (tf.io.gfile)
        raise ConfigError(
            f"cannot write to output.dir {root} (permission denied); choose a writable location"
        ) from None
    except (ConfigError, TransientError) as err:  # storage's errors name the path; say which setting it is
        raise type(err)(f"output.dir: {err}") from None


def train(cfg: Config, dist: Distribution, checked: Preflight) -> dict[str, Any]:
    started = time.perf_counter()
    cluster = dist.cluster
    is_chief = cluster.is_chief
    layout, manifest, state, weights_file = checked.layout, checked.manifest, checked.state, checked.weights_file

    global_batch = cfg.train.batch_size_per_replica * dist.replicas
    steps = steps_per_epoch(manifest.split_size("train"), global_batch, cfg.train.steps_per_epoch)
    cfg, run_plan = plan_lib.make_plan(cfg, ImageStats.from_manifest_extra(manifest.extra), global_batch, steps)
    if is_chief:
        _log_plan(run_plan)
    telemetry = _telemetry(cfg, dist, layout, steps)
    train_data = _distributed_training_data(cfg, dist, manifest, checked.train_files, telemetry.probe)
    validation = evaluation.split_data(cfg, dist.strategy, cluster.num_workers, manifest, "validation")

    with dist.strategy.scope():
        model = model_lib.build_model(
            manifest.num_classes, cfg.data.image_size, cfg.model, weights_file, seed=cfg.runtime.seed
        )
    _resume_after_completed_phases(model, state, layout)

    first_step = sum(r.epochs_run for r in state.phases.values()) * steps
    for name, phase_cfg in cfg.phases.items():
        if phase_cfg.epochs == 0 or name in state.phases:
            continue
        plan = plan_phase(name, cfg, steps, global_batch, first_step)
        compile_for_phase(model, plan, cfg, dist.strategy)
        baseline = _best_so_far(state)
        with feature_cache.fit_inputs(
            model, phase_cfg.unfreeze_blocks, cfg, dist, manifest, checked.train_files, global_batch,
            train_data, validation,
        ) as fit:  # fmt: skip
            result = run_phase(
                fit.model, plan, cfg, layout, fit.train_data, fit.validation, is_chief, manifest.class_names,
                baseline, telemetry, run_plan,
            )  # fmt: skip
        result.feature_cache = fit.cut
        first_step += result.epochs_run * steps
        state.phases[name] = result
        # The chief removes the phase's backup only once every worker is past the phase (a worker
        # still restoring or saving would fail on a vanished path).
        barrier(dist)
        if is_chief:
            checked.ensure_owner()
            model_lib.save_weights(model, layout.phase_weights(name), manifest.class_names)
            save_state(layout.state, state)
            storage.remove_tree(layout.backup(name))

    telemetry.run_finished()
    results = _final_evaluation(model, cfg, dist, manifest, validation)
    for split, values in results.items():
        telemetry.metrics.set_evaluation(split, values)
    fingerprint = weights_fingerprint(model)
    replicas = replica_fingerprints(model, dist.strategy)
    log.info("weights fingerprint %s (worker %d)", fingerprint, cluster.worker_index)
    if len(set(replicas)) > 1:
        log.error("the replicas of worker %d hold different weights: %s", cluster.worker_index, replicas)
    summary: dict[str, Any] = {}
    if is_chief:
        checked.ensure_owner()
    exported = _export(model, cfg, manifest, layout) if is_chief else {}
    report = _evaluation_report(cfg, dist, manifest, layout)
    if is_chief:
        checked.ensure_owner()
        summary = _summary(
            cfg,
            dist,
            manifest,
            state,
            results,
            exported,
            fingerprint,
            run_plan,
            time.perf_counter() - started,
        )
        summary["distribution"]["replica_fingerprints"] = replicas
        summary["evaluation_report"] = report
        storage.write_text(layout.summary, json.dumps(summary, indent=2) + "\n")
        if cfg.monitoring.curves:
            _write_curves(layout, state)
        state.complete = True
        save_state(layout.state, state)
        storage.remove_tree(storage.join(layout.root, "backup"))  # each phase's backup is gone already
        log.info("run summary written to %s", layout.summary)
    barrier(dist)
    return summary


def _log_plan(run_plan: plan_lib.Plan) -> None:
    for line in run_plan.lines():
        log.info("%s", line)
    for warning in run_plan.warnings:
        log.warning("%s", warning)


def _telemetry(cfg: Config, dist: Distribution, layout: RunLayout, steps: int) -> RunTelemetry:
    """The run's metrics (the process's, served since start-up) with the run's shape set."""
    metrics = metrics_lib.process_metrics()
    workers = dist.cluster.num_workers
    metrics.workers.set(workers)
    metrics.replicas.set(dist.replicas)
    metrics.group_restarts.set(count_attempt(layout.attempts, dist.cluster.is_chief) - 1)
    total_steps = sum(phase.epochs for phase in cfg.phases.values()) * steps
    return RunTelemetry(
        metrics,
        num_workers=workers,
        local_replicas=dist.local_devices,
        total_steps=total_steps,
    )


def _write_curves(layout: RunLayout, state: RunState) -> None:
    """The training curves as a PNG beside the summary; a drawing problem never fails the run."""
    from trainer.train.curves import render_curves

    rows = [row for result in state.phases.values() for row in result.history]
    try:
        storage.write_bytes(layout.curves, render_curves(rows))
    except Exception as err:  # matplotlib or storage trouble: the model and summary are safe already
        log.warning("could not write the training curves %s: %s", layout.curves, err)
        return
    log.info("training curves written to %s", layout.curves)


def _best_so_far(state: RunState) -> tuple[float, float] | None:
    """The best score of the completed phases (the model starts the next phase with it)."""
    scores = [tuple(r.best_score) for r in state.phases.values() if r.best_score is not None]
    return scores[-1] if scores else None


def _checked_weights_file(cfg: Config, manifest: Manifest) -> model_lib.WeightsFile | None:
    if not model_lib.uses_weights_file(cfg.model):
        return None
    weights = model_lib.read_weights_file(cfg.model.weights)
    model_lib.check_weights_file(weights, manifest.class_names)
    return weights


def _resume_after_completed_phases(model: keras.Model, state: RunState, layout: RunLayout) -> None:
    if not state.phases:
        return
    last = list(state.phases)[-1]
    model_lib.load_weights(model, layout.phase_weights(last))
    log.info("resuming after completed phase %s (weights %s)", last, layout.phase_weights(last))


def _distributed_training_data(cfg: Config, dist: Distribution, manifest: Manifest, files: list[str], probe=None):
    """Each worker's input pipeline reads its own shards (sharded here, not by tf.data)."""
    stagers = []  # kept alive as long as the datasets

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        own = pipeline.shards_for_worker(files, context.num_input_pipelines, context.input_pipeline_id)
        stager = _stager(cfg, manifest, files, own)
        stagers.append(stager)
        ds = pipeline.training_dataset(
            own,
            cfg.data,
            manifest.num_classes,
            context.get_per_replica_batch_size(cfg.train.batch_size_per_replica * dist.replicas),
            seed=cfg.runtime.seed + context.input_pipeline_id,
            deterministic=cfg.runtime.deterministic,
            stager=stager,
            probe=probe,
        )
        stall = os.environ.get(Env.TEST_STALL_INPUT_AFTER.value)  # test hook: a worker that never arrives
        return pipeline.stall_after(ds, int(stall)) if stall else ds

    return OneIterator(dist.strategy.distribute_datasets_from_function(dataset_fn))


class OneIterator(tf.distribute.DistributedDataset):
    """The training data with one iterator for the whole process.

    Keras creates an iterator at the start of every ``fit`` and drops it at the end. Under
    MultiWorkerMirroredStrategy (TF 2.21) destroying it joins a tf.data thread of tf.distribute's
    per-worker input pipeline, which held a non-chief worker 22-41 s at a phase's end in 6 of 8
    two-worker runs here (the chief waits for it in the next collective). With one iterator for
    both phases that teardown never happens; the stream just continues (it is endless and
    shuffled). The iterator lives as long as the process (``_LIVE``): dropping it when the run
    ends would move the same wait there, while the process's exit does not wait for it.
    """

    _LIVE: list = []

    def __init__(self, dataset):
        self._dataset, self._iterator = dataset, None

    def __iter__(self):
        if self._iterator is None:
            self._iterator = iter(self._dataset)
            OneIterator._LIVE.append(self._iterator)
        return self._iterator

    @property
    def element_spec(self):
        return self._dataset.element_spec


def _stager(cfg: Config, manifest: Manifest, files: list[str], own: list[str]):
    staging = cfg.data.staging
    if not staging.enabled or not all(storage.is_remote(f) for f in own):
        return None
    from trainer.data.staging import ShardStager, budget_bytes

    sizes = dict(zip(files, (s.bytes for s in manifest.shards["train"]), strict=True))
    directory = staging.dir or os.path.join(os.environ.get(Env.SCRATCH_DIR.value) or tempfile.gettempdir(), "shards")
    log.info("staging %d shard(s) to %s in the background", len(own), directory)
    budget = budget_bytes(staging.budget_gb, directory)
    return ShardStager(own, [sizes[f] for f in own], directory, budget, staging.parallel_downloads)


def _final_evaluation(
    model: keras.Model,
    cfg: Config,
    dist: Distribution,
    manifest: Manifest,
    validation: evaluation.EvaluationData | None,
) -> dict[str, Any]:
    """Validation, then the held-out test split, reported separately (test never selects). Exact."""
    evaluator = evaluation.Evaluator(model, cfg.train.label_smoothing)
    test = evaluation.split_data(cfg, dist.strategy, dist.cluster.num_workers, manifest, "test")
    results: dict[str, Any] = {}
    for data in (validation, test):
        if data is None:
            continue
        results[data.split] = evaluator.run(data)
        log.info(
            "final %s: loss=%.4f, accuracy=%.4f over %d images",
            data.split, results[data.split]["loss"], results[data.split]["accuracy"], results[data.split]["images"],
        )  # fmt: skip
    return results


def _export(model: keras.Model, cfg: Config, manifest: Manifest, layout: RunLayout) -> dict[str, str]:
    """Export a plain (non-distributed) copy, so saving needs no collectives with peers."""
    plain = model_lib.build_model(
        manifest.num_classes, cfg.data.image_size, config_lib.ModelConfig(weights="none", head=cfg.model.head)
    )
    plain.set_weights(model.get_weights())
    return export_model(plain, manifest.class_names, cfg.data.image_size, cfg.data.center_crop_fraction, layout)


def _evaluation_report(cfg: Config, dist: Distribution, manifest: Manifest, layout: RunLayout) -> dict[str, Any]:
    """The report (trainer.report) of the export on the test split (else validation); chief: its paths.

    Every worker runs the exported serving signature over its share of the split's records and
    writes its predictions beside the report; the chief joins them in worker order.
    """
    split = "test" if manifest.has_split("test") else "validation"
    if not cfg.output.evaluation_report or not manifest.has_split(split):
        return {}
    cluster = dist.cluster
    barrier(dist)  # the chief's export is complete
    files = pipeline.shard_paths(cfg.data.dataset, manifest, split)
    share = pipeline.evaluation_shares(files, [s.records for s in manifest.shards[split]], cluster.num_workers)[
        cluster.worker_index
    ]
    serve = export_lib.load_serving(layout.saved_model)
    predictions = report_lib.predict_records(serve, share.files, share.stride, share.offset)
    directory = layout.evaluation(split)
    storage.write_bytes(layout.evaluation_part(split, cluster.worker_index), predictions.to_npz())
    barrier(dist)  # every share is written
    if not cluster.is_chief:
        return {}
    parts = [layout.evaluation_part(split, i) for i in range(cluster.num_workers)]
    joined = report_lib.Predictions.concatenate([report_lib.Predictions.from_npz(storage.read_bytes(p)) for p in parts])
    report = report_lib.split_report(
        joined, manifest.class_names, split, manifest.split_size(split), layout.saved_model, cfg.data.dataset
    )
    paths = report_lib.write_report(report, directory)
    for part in parts:
        storage.remove_tree(part)
    for line in report_lib.table_lines(report, split):
        log.info("%s", line)
    log.info("evaluation report written to %s", paths["json"])
    return {"split": split, **paths}


def barrier(dist: Distribution) -> None:
    """All workers meet here before leaving, so none exits while a peer still needs it."""
    if not dist.cluster.is_multi_worker:
        return
    sum_over_workers(dist.strategy)(tf.constant(1.0))


def versions() -> dict[str, str]:
    return {
        "trainer": trainer.__version__,
        "tensorflow": tf.__version__,
        "tf_keras": keras.__version__,
        "python": platform.python_version(),
    }


def _summary(cfg, dist, manifest, state, results, exported, fingerprint, run_plan, seconds):
    global_batch, steps = run_plan.global_batch, run_plan.steps_per_epoch
    return {
        "status": "complete",
        "config": config_lib.to_dict(cfg),
        "plan": run_plan.to_dict(),
        "dataset": {
            "classes": manifest.class_names,
            "images": {split: manifest.split_size(split) for split in manifest.counts},
        },
        "distribution": {
            "strategy": dist.kind,
            "workers": dist.cluster.num_workers,
            "replicas": dist.replicas,
            "global_batch": global_batch,
            "steps_per_epoch": steps,
            "local_devices": dist.local_devices,
            "mixed_precision": dist.mixed_precision,
            "precision_policy": dist.precision or "float32",
            "jit_compile": cfg.runtime.jit_compile,
        },
        "phases": {name: asdict(result) for name, result in state.phases.items()},
        "evaluation": results,
        "export": exported,
        "weights_fingerprint": fingerprint,
        "timings": {
            "total_seconds": round(seconds, 2),
            **{f"{name}_seconds": r.seconds for name, r in state.phases.items()},
        },
        "versions": versions(),
    }
