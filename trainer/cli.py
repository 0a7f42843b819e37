"""The `trainer` command: config, prepare, train, launch, predict, evaluate, job, demo, bench.

Every command ends with a documented exit code (trainer.contract.ExitCode): user errors
print one line naming the problem and the fix and are not worth retrying; transient
faults are.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from trainer.contract import Env, ExitCode
from trainer.errors import ConfigError, DataError, Preempted, TrainerError, TransientError, tf_error_summary

log = logging.getLogger("trainer")


class Parser(argparse.ArgumentParser):
    """argparse with the trainer's contract: a bad command line is one line and exit 64, not a usage block and 2.

    Sub-commands' parsers are of this class too (argparse builds them with the parent's class).
    """

    def error(self, message: str):
        print(f"error: {message}; see `{self.prog} --help`", file=sys.stderr, flush=True)
        raise SystemExit(int(ExitCode.CONFIG_ERROR))

    def parse_args(self, args=None, namespace=None):
        # Unknown options are found by the top parser; the hint should name the sub-command they were given to.
        parsed, extras = self.parse_known_args(args, namespace)
        owner = vars(parsed).pop("_parser", self)
        if extras:
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get(Env.CONFIG_FILE.value),
        help=f"YAML configuration file (default: ${Env.CONFIG_FILE.value})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set phases.fine_tuning.epochs=3 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="trainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the effective configuration (YAML)")
    _add_config_args(p)
    p.add_argument("--reference", action="store_true", help="print the configuration reference (markdown)")

    p = sub.add_parser("prepare", help="image folder -> sharded TFRecords + manifest")
    p.add_argument("source", help="folder with one sub-folder per class (optionally under train/ validation/ test/)")
    p.add_argument("dataset", help="output directory of the prepared dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    _add_config_args(p)

    p = sub.add_parser("train", help="train (one worker of a cluster when TF_CONFIG is set)")
    _add_config_args(p)

    p = sub.add_parser("launch", help="run N local worker processes of `trainer train`")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes (default 2)")
    _add_config_args(p)

    p = sub.add_parser("predict", help="classify image files with an exported model")
    p.add_argument("model", help="export directory (holding saved_model/) or the SavedModel itself")
    p.add_argument("images", nargs="+", help="image files (JPEG or PNG)")
    p.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")

    p = sub.add_parser("evaluate", help="evaluation report of an exported model on a prepared split")
    p.add_argument("model", help="run directory (output.dir), its export/ or the SavedModel; local or gs://")
    p.add_argument("dataset", help="prepared dataset directory (local or gs://)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"], help="split (default test)")
    p.add_argument("--output", default=None, help="directory for the report (default ./evaluation-<split>)")
    p.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")

    p = sub.add_parser("job", help="run the chart's Indexed Job on this machine (`helm template` output)")
    job_sub = p.add_subparsers(dest="job_command", required=True)
    p = job_sub.add_parser("run", help="one process per pod, with the Job controller's behaviour")
    p.add_argument("manifests", help="rendered manifests (multi-document YAML, e.g. `helm template` output); - = stdin")
    p.add_argument("--timeout", type=float, default=None, help="stop the Job after S seconds (default: no limit)")
    p.add_argument("--namespace", "-n", default=None, help="the pods' namespace (default: the Job's, else default)")
    p.add_argument("--network", choices=["auto", "pod", "host"], default="auto", help="pod networking (default auto)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME=DIR", help="a volume as a local directory")
    p.add_argument("--keep-workdir", action="store_true", help="keep the pods' volume directories")

    p = sub.add_parser("bench", help="performance benchmark suite (docs/benchmarks.md)")
    p.add_argument("--out", default="benchmarks.json", help="JSON result file (default benchmarks.json)")
    p.add_argument("--table", default="benchmarks.md", help="markdown table file (default benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds not minutes (for tests)")
    p.add_argument("--workdir", default=None, help="keep generated data, logs and runs here (default: a temp dir)")

    p = sub.add_parser("demo", help="end-to-end demo on a generated dataset with 2 local workers")
    p.add_argument("--workdir", default="demo-run", help="where the demo writes everything (default ./demo-run)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    for command in [*sub.choices.values(), *job_sub.choices.values()]:
        command.set_defaults(_parser=command)  # the innermost command's parser wins: Parser.parse_args
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # tf-keras (Keras 2) is the Keras that runs MultiWorkerMirroredStrategy; must be set before TF loads.
    os.environ.setdefault(Env.LEGACY_KERAS.value, "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(_run(args) or ExitCode.OK)
    except TrainerError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return int(err.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.PREEMPTED)
    except Exception as err:
        classified = classify(err)
        if classified is None:
            raise  # a bug: keep the traceback; Python exits with 1 (ExitCode.INTERNAL)
        print(f"error: {classified}", file=sys.stderr, flush=True)
        return int(classified.exit_code)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_sigterm(signum, frame) -> None:
    # Kubernetes sends SIGTERM before killing a pod. The run resumes from its last backup.
    raise Preempted("received SIGTERM; stopping (the run resumes from its last backup when restarted)")


def classify(err: Exception) -> TrainerError | None:
    """Map TensorFlow's runtime errors and the OS's write errors to user errors or transient faults."""
    if isinstance(err, OSError) and err.errno in _OS_WRITE_ERRNOS:
        from trainer import storage

        return storage.local_write_error(err, err.filename or "a file")
    if isinstance(err, RuntimeError) and f"REPLACED BY {Preempted.__name__}" in str(err):
        # SIGTERM's Preempted raised while TensorFlow's C++ layer was translating its own error:
        # pybind11 reports the swap as a RuntimeError. The stop request is what happened.
        return Preempted(
            "received SIGTERM while TensorFlow reported an error; stopping (the run resumes from its last backup)"
        )
    if "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf

    first_line = tf_error_summary(str(err)) or type(err).__name__
    if isinstance(err, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)):
        return TransientError(f"{type(err).__name__}: {first_line} (a peer or the storage is unreachable; retry)")
    if isinstance(err, tf.errors.DataLossError):
        return DataError(f"a dataset file is corrupt ({first_line}); re-run `trainer prepare`")
    if isinstance(err, tf.errors.NotFoundError):
        return DataError(f"a file is missing ({first_line}); check data.dataset and re-run `trainer prepare`")
    # TensorFlow's own writes (checkpoints, TensorBoard, SavedModel) fail as "<path>; <strerror>".
    if isinstance(err, tf.errors.ResourceExhaustedError) and first_line.endswith(_NO_SPACE):
        from trainer import storage

        return storage.local_write_error(OSError(errno.ENOSPC, _NO_SPACE), first_line.removesuffix(_NO_SPACE))
    if isinstance(err, tf.errors.PermissionDeniedError) and first_line.endswith(_READ_ONLY):
        return ConfigError(
            f"cannot write {first_line.removesuffix(_READ_ONLY)}: read-only file system; choose a writable location"
        )
    if isinstance(err, tf.errors.PermissionDeniedError):
        return DataError(f"permission denied ({first_line}); grant access to the dataset and output locations")
    return None


#: OS errors of writes that the trainer's storage layer would have named (scratch files, TF-free writers).
_OS_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_NO_SPACE = "; No space left on device"
_READ_ONLY = "; Read-only file system"


def _run(args: argparse.Namespace) -> int | None:
    if args.command == "predict":
        from trainer.predict import predict_command

        return predict_command(args.model, args.images, args.top_k, args.json)
    if args.command == "evaluate":
        from trainer.report import evaluate_command

        return evaluate_command(args.model, args.dataset, args.split, args.output, args.top_k)
    if args.command == "job":
        from trainer.jobrunner import run_job_file

        return run_job_file(args.manifests, args.timeout, args.namespace, args.network, args.volume, args.keep_workdir)
    if args.command == "demo":
        from trainer.demo import run_demo

        return run_demo(args.workdir, args.workers)
    if args.command == "bench":
        from trainer.bench.suite import run_bench

        run_bench(args.out, args.table, args.quick, args.workdir, say=lambda m: print(m, file=sys.stderr, flush=True))
        return None

    from trainer import config as config_lib

    if args.command == "config" and args.reference:
        print(config_lib.reference_markdown(), end="")
        return None
    cfg = config_lib.load_config(args.config, args.overrides)
    from trainer import gcs

    gcs.set_retry_budget(cfg.storage.retry_budget_seconds)
    if args.command == "config":
        return _show_config(cfg)
    if args.command == "prepare":
        return _prepare(args, cfg)
    config_lib.require(cfg, "data.dataset", "output.dir")  # train and launch; before TensorFlow loads
    if args.command == "launch":
        from trainer.launch import launch_local, stop_grace_seconds

        return launch_local(args.workers, _train_args(args), grace_seconds=stop_grace_seconds(cfg.runtime))
    if args.command == "train":
        return _train(cfg)
    raise ConfigError(f"unknown command {args.command}")  # pragma: no cover - argparse rejects it first


def _show_config(cfg) -> None:
    """The effective configuration (YAML), then the plan it gives as YAML comments.

    With data.dataset set, the plan uses the dataset's image stats and size (for 1 replica:
    the global batch and learning rates grow with the workers as the plan lines say).
    """
    from trainer import config as config_lib
    from trainer.data.manifest import read_manifest
    from trainer.data.stats import ImageStats
    from trainer.train.plan import make_plan

    manifest, unread = None, ""
    if cfg.data.dataset:
        try:
            manifest = read_manifest(cfg.data.dataset)
        except DataError as err:  # the configuration is still worth seeing
            unread = f" ({err})"
    stats = ImageStats.from_manifest_extra(manifest.extra) if manifest else None
    batch = cfg.train.batch_size_per_replica
    steps = cfg.train.steps_per_epoch or (manifest.split_size("train") // batch if manifest else 0)
    resolved, plan = make_plan(cfg, stats, batch, steps)
    print(config_lib.to_yaml(resolved), end="")
    where = (
        f"on {cfg.data.dataset}"
        if manifest
        else f"without a dataset{unread or ' (set data.dataset for its image stats)'}"
    )
    print(f"# the plan for 1 replica {where}:")
    for line in [*plan.lines(), *(f"warning: {w}" for w in plan.warnings)]:
        print(f"# {line}")


def _train_args(args: argparse.Namespace) -> list[str]:
    from trainer.config import set_args

    return ["train", *(["--config", args.config] if args.config else []), *set_args(*args.overrides)]


def _prepare(args: argparse.Namespace, cfg) -> None:
    from trainer.data.prepare import prepare_dataset

    report = prepare_dataset(
        args.source, args.dataset, cfg.prepare, overwrite=args.overwrite, upload_workers=cfg.storage.upload_workers
    )
    for line in report.summary_lines():
        print(line)


def _train(cfg) -> None:
    from trainer import cluster as cluster_lib

    started = time.time()
    endpoint = _serve_metrics(cfg.monitoring)  # before TensorFlow: a worker stuck at start-up is visible too
    try:
        cluster = cluster_lib.parse_tf_config(cluster_lib.tf_config_from_env(os.environ))
        push = cluster.is_chief and bool(_pushgateway_url(cfg))
        try:
            summary = _train_cluster(cfg, cluster)
        except BaseException as err:
            if push:
                _push_outcome(cfg, started, _exit_code_of(err), {})
            raise
        if push and summary is not None:  # None: the run was complete already; its outcome was pushed then
            _push_outcome(cfg, started, ExitCode.OK, summary)
    finally:
        if endpoint is not None:
            endpoint.close()


def _serve_metrics(monitoring):
    if not monitoring.enabled:
        return None
    from trainer import metrics

    return metrics.serve(metrics.process_metrics(), metrics.metrics_port(monitoring.port), monitoring.address)


def _push_outcome(cfg, started: float, code: int, summary: dict) -> None:
    """Finished runs stay visible after their pods are gone: the chief pushes how the run ended."""
    from trainer import metrics

    process = metrics.process_metrics()
    outcome = metrics.Outcome(
        exit_code=int(code),
        started=started,
        global_steps=int(process.registry.get_sample_value(metrics.GLOBAL_STEP) or 0),
        evaluation=summary.get("evaluation"),
    )
    metrics.push_outcome(_pushgateway_url(cfg), cfg.monitoring.pushgateway_job, outcome)


def _pushgateway_url(cfg) -> str:
    from trainer import metrics

    return metrics.pushgateway_url(cfg.monitoring.pushgateway_url)


def _exit_code_of(err: BaseException) -> int:
    """The exit code main() turns ``err`` into."""
    if isinstance(err, TrainerError):
        return int(err.exit_code)
    if isinstance(err, KeyboardInterrupt):
        return int(ExitCode.PREEMPTED)
    classified = classify(err) if isinstance(err, Exception) else None
    return int(classified.exit_code) if classified is not None else int(ExitCode.INTERNAL)


def _train_cluster(cfg, cluster) -> dict | None:
    """Train; the run summary (chief) or {} (other workers), None when the run was complete already."""
    from trainer.train.run import preflight

    checked = preflight(cfg, cluster)  # bad input fails here, before waiting for peers
    try:
        return _train_checked(cfg, cluster, checked)
    finally:
        checked.release()  # the chief's lease on output.dir, however the run ends


def _train_checked(cfg, cluster, checked) -> dict | None:
    from trainer import cluster as cluster_lib
    from trainer.strategy import build_distribution
    from trainer.train.run import train

    if checked.state.complete:
        log.info("the run in %s is already complete; nothing to do", checked.layout.root)
        return None
    if cfg.runtime.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    if cluster.is_multi_worker:
        from trainer.rendezvous import wait_for_peers

        if Env.TF_CONFIG.value not in os.environ:
            os.environ[Env.TF_CONFIG.value] = cluster_lib.make_tf_config(list(cluster.workers), cluster.task_index)
        wait_for_peers(cluster.workers, cluster.worker_index, cfg.runtime.peer_wait_seconds)
    dist = build_distribution(cluster, cfg.runtime)  # first TF op of the process: strategies must come first
    from trainer.data.pipeline import naming_damaged_shards

    with naming_damaged_shards(cfg.data.dataset, checked.manifest):
        summary = train(cfg, dist, checked)
    if cluster.is_multi_worker and cluster.is_chief:
        from trainer.rendezvous import wait_for_peers_to_leave

        # A peer still up one heartbeat timeout after the barrier is hung; the chief stops waiting.
        bound = cfg.runtime.heartbeat_timeout_seconds
        waited = wait_for_peers_to_leave(cluster.workers, cluster.worker_index, bound)
        log.info("all peers left %.1f s after the final barrier; the chief exits last", waited)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
