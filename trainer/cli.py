"""The `trainer` command: config, prepare, train, launch, plan, doctor, status, predict, evaluate, job, demo, bench.

Every command ends with a documented exit code (trainer.contract.ExitCode): user errors
print one line naming the problem and the fix and are not worth retrying; transient
faults are.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from trainer.contract import LOCAL_LISTEN_ADDRESS, Env, ExitCode
from trainer.errors import ConfigError, DataError
from trainer.exits import explain
from trainer.signals import preempt_on_sigterm

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
    p.add_argument("--json-schema", action="store_true", help="print the JSON Schema of the chart's `trainer` value")

    p = sub.add_parser("prepare", help="image folder -> sharded TFRecords + manifest")
    p.add_argument("source", help="folder with one sub-folder per class (optionally under train/ validation/ test/)")
    p.add_argument("dataset", help="output directory of the prepared dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
    _add_config_args(p)

    p = sub.add_parser("train", help="train (one worker of a cluster when TF_CONFIG is set)")
    _add_config_args(p)

    p = sub.add_parser("launch", help="run N local worker processes of `trainer train`")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes (default 2)")
    p.add_argument(
        "--listen-address",
        default=LOCAL_LISTEN_ADDRESS,
        help=f"address of the workers' metrics endpoints unless monitoring.address is set (default "
        f"{LOCAL_LISTEN_ADDRESS}: this machine only; 0.0.0.0 = every interface)",
    )
    _add_config_args(p)

    p = sub.add_parser("doctor", help="check what a run needs here: dataset, output, peers, GPUs, weights")
    p.add_argument(
        "--gpus", type=int, default=None, help="GPUs that must be visible (default $TRAINER_GPUS_PER_WORKER, else 0)"
    )
    _add_config_args(p)

    p = sub.add_parser("status", help="a run's phase, progress, speed, loss, ETA, backups, restarts, Job conditions")
    p.add_argument("release", nargs="?", help="Helm release (read through the API server with your kubeconfig)")
    p.add_argument("--namespace", "-n", default=None, help="the release's namespace (default: the context's)")
    p.add_argument("--context", default=None, help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--metrics-url", action="append", default=[], metavar="URL", help="read this /metrics directly instead "
        "(repeat per worker, the chief first)"
    )  # fmt: skip
    p.add_argument("--watch", "-w", action="store_true", help="refresh every --interval seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch (default 10)")
    p.add_argument("--sample-seconds", type=float, default=3.0, help="seconds between the two reads (default 3)")

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

    p = job_sub.add_parser("test", help="run the `helm test` pods (trainer doctor) of the rendered manifests")
    p.add_argument("manifests", help="rendered manifests (`helm template` output); - = stdin")
    p.add_argument("--timeout", type=float, default=600, help="stop a test pod after S seconds (default 600)")
    p.add_argument("--namespace", "-n", default=None, help="the pods' namespace (default: the Job's, else default)")
    p.add_argument("--network", choices=["auto", "pod", "host"], default="auto", help="pod networking (default auto)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME=DIR", help="a volume as a local directory")

    p = sub.add_parser("bench", help="performance benchmark suite (docs/benchmarks.md)")
    p.add_argument("--out", default="benchmarks.json", help="JSON result file (default benchmarks.json)")
    p.add_argument("--table", default="benchmarks.md", help="markdown table file (default benchmarks.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds not minutes (for tests)")
    p.add_argument("--workdir", default=None, help="keep generated data, logs and runs here (default: a temp dir)")
    p.add_argument(
        "--allow-busy",
        action="store_true",
        help="overwrite --out/--table even when the machine is busy (the files then say so at the top)",
    )

    p = sub.add_parser("plan", help="expected time, GPU-hours and cost of a run per worker count")
    from trainer.estimate import add_plan_arguments

    add_plan_arguments(p)
    _add_config_args(p)

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
    with preempt_on_sigterm():  # SIGTERM -> Preempted -> exit 76; the whole chain: trainer.signals
        try:
            return int(_run(args) or ExitCode.OK)
        except BaseException as err:
            explained = explain(err)
            if explained is None:
                raise  # a bug (or SystemExit): keep the traceback; Python exits with 1 (ExitCode.INTERNAL)
            if not isinstance(err, KeyboardInterrupt):
                print(f"error: {explained}", file=sys.stderr, flush=True)
            return int(explained.exit_code)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int | None:
    if args.command == "predict":
        from trainer.predict import predict_command

        return predict_command(args.model, args.images, args.top_k, args.json)
    if args.command == "evaluate":
        from trainer.report import evaluate_command

        return evaluate_command(args.model, args.dataset, args.split, args.output, args.top_k)
    if args.command == "job" and args.job_command == "test":
        from trainer.jobrunner.testpods import run_test_file

        return run_test_file(args.manifests, args.timeout, args.namespace, args.network, args.volume)
    if args.command == "job":
        from trainer.jobrunner import run_job_file

        return run_job_file(args.manifests, args.timeout, args.namespace, args.network, args.volume, args.keep_workdir)
    if args.command == "status":
        from trainer.status import status_command

        if args.release and args.metrics_url:
            raise ConfigError("give RELEASE or --metrics-url, not both")
        return status_command(
            args.release, args.namespace, args.context, args.metrics_url, args.watch, args.interval, args.sample_seconds
        )
    if args.command == "demo":
        from trainer.demo import run_demo

        return run_demo(args.workdir, args.workers)
    if args.command == "bench":
        from trainer.bench.suite import run_bench

        run_bench(args.out, args.table, args.quick, args.workdir, say=_to_stderr, allow_busy=args.allow_busy)
        return None

    from trainer import config as config_lib

    if args.command == "config" and (args.reference or args.json_schema):
        from trainer import config_docs

        print(config_docs.reference_markdown() if args.reference else config_docs.chart_json(), end="")
        return None
    cfg = config_lib.load_config(args.config, args.overrides)
    from trainer import gcs

    gcs.set_retry_budget(cfg.storage.retry_budget_seconds)
    if args.command == "config":
        return _show_config(cfg)
    if args.command == "prepare":
        return _prepare(args, cfg)
    if args.command == "doctor":
        from trainer.doctor import doctor_command

        return doctor_command(cfg, args.gpus)
    if args.command == "plan":
        from trainer.estimate import plan_command

        config_lib.require(cfg, "data.dataset")
        return plan_command(cfg, args)
    config_lib.require(cfg, "data.dataset", "output.dir")  # train and launch; before TensorFlow loads
    if args.command == "launch":
        from trainer.launch import launch_local, stop_grace_seconds

        return launch_local(args.workers, _launch_args(args, cfg), grace_seconds=stop_grace_seconds(cfg.runtime))
    if args.command == "train":
        from trainer import worker

        return worker.run(cfg)
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


def _launch_args(args: argparse.Namespace, cfg) -> list[str]:
    """The workers' `trainer train` arguments: the metrics endpoint on --listen-address unless the
    configuration names an address (the endpoint is unauthenticated; docs/operations.md, "Trust model")."""
    if cfg.monitoring.address:
        return _train_args(args)
    return [*_train_args(args), "--set", f"monitoring.address={json.dumps(args.listen_address)}"]  # YAML string


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


if __name__ == "__main__":
    raise SystemExit(main())
