"""Names shared between the trainer, the Helm chart, the Dockerfile and the docs.

This module is the single source of truth for every name that crosses a process or
packaging boundary: exit codes, environment variables, ports and file names. The chart,
the manifests and the docs are checked against it by the tests.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes. The chart's podFailurePolicy keys off these values.

    User errors (bad configuration, bad data) are not worth retrying: the Job fails at
    once. Transient faults (network, storage hiccups, a peer that did not come up) are
    retried within the Job's backoffLimit. A preempted worker exits with PREEMPTED, which
    the chart treats like a disruption (no retry budget spent).
    """

    OK = 0
    INTERNAL = 1  # an unexpected exception: a bug or an unclassified fault; retried
    CONFIG_ERROR = 64  # bad configuration or command line (sysexits EX_USAGE); not retried
    DATA_ERROR = 65  # bad dataset, manifest, weights file or backup (EX_DATAERR); not retried
    TRANSIENT = 75  # network/storage/peer fault worth retrying (EX_TEMPFAIL)
    PREEMPTED = 76  # SIGTERM received; state saved; restart without spending retry budget


#: Exit codes after which a retry cannot help.
NON_RETRIABLE_EXIT_CODES = (ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR)
#: Exit codes that mean "try again".
RETRIABLE_EXIT_CODES = (ExitCode.INTERNAL, ExitCode.TRANSIENT)


class Env(enum.StrEnum):
    """Environment variables the trainer reads."""

    TF_CONFIG = "TF_CONFIG"  # standard tf.distribute cluster description
    CONFIG_FILE = "TRAINER_CONFIG"  # path of the YAML configuration (the chart's ConfigMap)
    LOG_PREFIX = "TRAINER_LOG_PREFIX"  # set by the local launcher; informational
    LEGACY_KERAS = "TF_USE_LEGACY_KERAS"  # must be "1": tf-keras (Keras 2) runs MWMS
    # Set by the Helm chart on an Indexed Job's pods; the trainer derives TF_CONFIG from them.
    COMPLETION_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes for Indexed Jobs
    NUM_WORKERS = "TRAINER_NUM_WORKERS"
    JOB_NAME = "TRAINER_JOB_NAME"
    SERVICE_NAME = "TRAINER_SERVICE_NAME"  # the headless Service (the pods' subdomain)
    NAMESPACE = "TRAINER_NAMESPACE"
    WORKER_PORT = "TRAINER_WORKER_PORT"
    SCRATCH_DIR = "TRAINER_SCRATCH_DIR"  # writable local scratch (emptyDir) for staging and caches
    IMAGE = "TRAINER_IMAGE"  # the container image reference, reported in trainer_build_info
    GPUS_PER_WORKER = "TRAINER_GPUS_PER_WORKER"  # GPUs the pod asked for (`trainer doctor` checks them)
    # The metrics endpoint's port, overriding monitoring.port: the local launcher gives each worker its own.
    METRICS_PORT = "TRAINER_METRICS_PORT"
    # Who owns the run (trainer.train.lease), set by the local launcher for its workers: a re-run of
    # the same launcher takes over its own lease.
    RUN_OWNER = "TRAINER_RUN_OWNER"
    # The Pushgateway URL, overriding monitoring.pushgateway_url; may carry credentials (the chart
    # sets it from a Secret, so they never reach the ConfigMap).
    PUSHGATEWAY_URL = "TRAINER_PUSHGATEWAY_URL"
    # Test hook, never set in production: this process's training input blocks forever after this many
    # batches (trainer.data.pipeline.stall_after), so it stays alive but never enters the next collective.
    TEST_STALL_INPUT_AFTER = "TRAINER_TEST_STALL_INPUT_AFTER"


#: What a stop may take beyond ``runtime.stop_check_seconds``: the step in progress and one backup.
#: The chart requires terminationGracePeriodSeconds >= stop_check_seconds + this; the local
#: launcher waits this long past the stop check for workers it stops after a failure.
STOP_MARGIN_SECONDS = 20

#: Seconds a run's lease on its output.dir lasts without renewal (trainer.train.lease; the chart adds
#: it to terminationGracePeriodSeconds for output.lease_wait_seconds).
DEFAULT_LEASE_SECONDS = 120

#: Port each worker listens on for tf.distribute collectives (the chart's worker port).
WORKER_PORT = 2222
#: Port of the Prometheus metrics endpoint on every worker.
METRICS_PORT = 9090
#: Where `trainer launch` workers serve metrics unless told otherwise: this machine only (the
#: endpoint is unauthenticated; in a pod the chart's NetworkPolicy guards it instead).
LOCAL_LISTEN_ADDRESS = "127.0.0.1"

#: The console script installed by pyproject and used as the container entrypoint.
ENTRYPOINT = "trainer"
#: Fixed non-root user and group of the container image; the chart's securityContext uses it.
CONTAINER_UID = 10001
CONTAINER_GID = 10001
#: Where the chart mounts the ConfigMap holding the trainer's configuration.
CONFIG_MOUNT_DIR = "/etc/trainer"
CONFIG_FILE_NAME = "config.yaml"
#: Writable scratch directory in the container (an emptyDir in the chart).
SCRATCH_MOUNT_DIR = "/scratch"

# File names inside a prepared dataset and a run's output directory.
MANIFEST_FILE = "manifest.json"
PREPARE_REPORT_FILE = "prepare-report.json"
#: Beside the shards while `trainer prepare` runs (never in a finished dataset): the shards complete so far.
PREPARE_PROGRESS_FILE = "prepare-progress.json"
RUN_SUMMARY_FILE = "summary.json"
RUN_CURVES_FILE = "training-curves.png"  # the chief's picture of the run, beside the summary
RUN_ATTEMPTS_FILE = "attempts.json"  # how often the run was started (trainer_group_restarts)
METRICS_LOG_FILE = "metrics.jsonl"
LABELS_FILE = "labels.txt"
LEASE_FILE = "owner.json"  # trainer.train.lease: which run holds an output.dir
EVALUATION_FILE = "evaluation.json"  # trainer.report: the per-class evidence of a model on a split
CONFUSION_MATRIX_FILE = "confusion-matrix.png"

# Packaging: the Helm chart, the plain manifests and the container image use these.
#: Name of the Helm chart (helm/<CHART_NAME>/) and of the container image.
CHART_NAME = "vgg-trainer"
IMAGE_NAME = "vgg-trainer"
#: Name of the trainer container in the chart's Job (the podFailurePolicy rules name it).
CONTAINER_NAME = "trainer"
#: Names of the worker and metrics ports on the pods and the headless Service.
WORKER_PORT_NAME = "worker"
METRICS_PORT_NAME = "metrics"
#: Path on the metrics port that answers 200 while the process runs (the chart's liveness probe).
HEALTH_PATH = "/healthz"
#: The Keras VGG16 "notop" ImageNet weights file, baked into the image at build time; the chart's
#: default ``model.weights``. tf-keras caches downloads under ~/.keras only when it is writable,
#: which a read-only root filesystem rules out, so the image keeps the file at a fixed path.
VGG16_NOTOP_WEIGHTS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
BAKED_WEIGHTS_PATH = "/opt/vgg-trainer/weights/" + VGG16_NOTOP_WEIGHTS_FILE
#: Prefix of every Prometheus metric the trainer exports (the chart's dashboard and rules use it).
METRIC_PREFIX = "trainer_"
