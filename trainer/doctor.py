"""`trainer doctor`: check, before or beside a run, what a run needs from where it runs.

One line per check: ``ok``, ``skip`` (nothing to check here) or ``FAIL`` with the problem and its
fix. The exit code is the first failure's, from the trainer's own classification
(trainer.contract.ExitCode: 64 configuration, 65 data, 75 transient), so a `helm test` pod fails
the way a worker with the same problem would. The chart's test hook runs it with the run's
configuration, environment and ServiceAccount (the workers' identity); it also runs locally.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from trainer.contract import WORKER_PORT, Env, ExitCode
from trainer.errors import ConfigError, DataError, TransientError

#: The first bytes of every HDF5 file (Keras .h5 weights).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class Skip(Exception):
    """Nothing to check in this setting; the message says why."""


@dataclass
class Result:
    name: str
    status: str  # "ok", "skip" or "FAIL"
    detail: str
    exit_code: int = ExitCode.OK

    def line(self) -> str:
        return f"{self.status:<4} {self.name:<8} {self.detail}"


def check_manifest(cfg, env: Mapping[str, str]) -> str:
    from trainer.data.manifest import manifest_path, read_manifest

    manifest = read_manifest(cfg.data.dataset)
    splits = ", ".join(
        f"{s} {manifest.split_size(s)}" for s in ("train", "validation", "test") if manifest.has_split(s)
    )
    return f"{manifest_path(cfg.data.dataset)} readable: {manifest.num_classes} classes; images {splits}"


def check_output(cfg, env: Mapping[str, str]) -> str:
    """Write, read back and delete a probe object: the run writes backups there."""
    from trainer import storage

    if not cfg.output.dir:
        raise ConfigError("output.dir is not set; pass --set output.dir=DIR (gs://bucket/prefix or a path)")
    probe = storage.join(cfg.output.dir, f".doctor-probe-{socket.gethostname()}-{os.getpid()}")
    data = b"trainer doctor probe\n"
    try:
        storage.write_bytes(probe, data)
        if storage.read_bytes(probe) != data:
            raise DataError(f"{probe} read back differs from what was written; check the storage behind output.dir")
    except PermissionError as err:
        raise DataError(
            f"cannot write under {cfg.output.dir} ({err}); grant the workers' identity write access"
        ) from None
    finally:
        # A failed write left nothing to delete; the write's error is the one to report.
        with contextlib.suppress(Exception):
            storage.remove_tree(probe)
    if storage.exists(probe):
        raise DataError(f"{probe} could not be deleted; grant the workers' identity delete access on output.dir")
    return f"{cfg.output.dir}: a probe object was written, read back and deleted"


def peer_hosts(env: Mapping[str, str]) -> list[tuple[str, int]]:
    """(host, port) of every worker: TF_CONFIG's, else the chart's Indexed Job names."""
    from trainer.cluster import parse_tf_config

    if env.get(Env.TF_CONFIG.value, "").strip():
        workers = parse_tf_config(env[Env.TF_CONFIG.value]).workers
        return [(w.rsplit(":", 1)[0], int(w.rsplit(":", 1)[1])) for w in workers]
    count = int(env.get(Env.NUM_WORKERS.value) or 1)
    if count <= 1:
        return []
    names = [env.get(v.value, "") for v in (Env.JOB_NAME, Env.SERVICE_NAME, Env.NAMESPACE)]
    if not all(names):
        raise ConfigError(
            f"{Env.NUM_WORKERS.value}={count} but TRAINER_JOB_NAME/TRAINER_SERVICE_NAME/TRAINER_NAMESPACE are not "
            "all set; run it with the chart's environment or set TF_CONFIG"
        )
    job, service, namespace = names
    port = int(env.get(Env.WORKER_PORT.value) or WORKER_PORT)
    return [(f"{job}-{i}.{service}.{namespace}.svc", port) for i in range(count)]


def check_dns(cfg, env: Mapping[str, str]) -> str:
    hosts = peer_hosts(env)
    if not hosts:
        raise Skip("one worker: no peers to resolve")
    for host, port in hosts:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise TransientError(
                f"{host} does not resolve ({err.strerror or err}); the headless Service publishes the Job's pods "
                "from their creation: run it while the run's pods exist (not still queued, not finished)"
            ) from None
    return f"{len(hosts)} worker name(s) resolve: {hosts[0][0]} ... {hosts[-1][0]}"


def check_gpus(cfg, env: Mapping[str, str], expected: int) -> str:
    if expected <= 0:
        raise Skip("no GPU asked for")
    import tensorflow as tf

    if not tf.test.is_built_with_cuda():
        raise ConfigError(
            f"{expected} GPU(s) asked for but this TensorFlow build has no CUDA support; use the GPU image "
            "(built FROM tensorflow/tensorflow:*-gpu)"
        )
    seen = len(tf.config.list_physical_devices("GPU"))
    if seen < expected:
        raise TransientError(
            f"TensorFlow sees {seen} of the {expected} GPU(s) asked for; check the node's NVIDIA driver and device "
            "plugin, the pod's GPU limit and CUDA_VISIBLE_DEVICES"
        )
    return f"TensorFlow (CUDA build) sees {seen} GPU(s); {expected} asked for"


def check_weights(cfg, env: Mapping[str, str]) -> str:
    from trainer import storage

    weights = cfg.model.weights
    if weights.lower() in ("imagenet", "none", "null", "random"):
        raise Skip(f"model.weights={weights}: no weights file")
    try:
        head = storage.read_bytes(weights)[: len(HDF5_SIGNATURE)]
    except FileNotFoundError:
        raise DataError(
            f"model.weights {weights} does not exist; fix the path (the image bakes it in at "
            "/opt/vgg-trainer/weights/) or use 'imagenet' or 'none'"
        ) from None
    if head != HDF5_SIGNATURE:
        raise DataError(f"model.weights {weights} is not an HDF5 (.h5) file; point it at the Keras VGG16 .h5 file")
    return f"{weights}: an HDF5 weights file, {storage.size(weights) / 1e6:.1f} MB"


def _run_one(name: str, check: Callable[[], str]) -> Result:
    from trainer.errors import TrainerError
    from trainer.exits import explain

    try:
        return Result(name, "ok", check())
    except Skip as skip:
        return Result(name, "skip", str(skip))
    except Exception as err:  # every failure becomes its line and the trainer's exit code
        explained = explain(err) or TrainerError(f"{type(err).__name__}: {err} (unexpected; please report it)")
        return Result(name, "FAIL", str(explained), int(explained.exit_code))


def run_checks(cfg, env: Mapping[str, str], gpus: int) -> list[Result]:
    return [
        _run_one("manifest", lambda: check_manifest(cfg, env)),
        _run_one("output", lambda: check_output(cfg, env)),
        _run_one("dns", lambda: check_dns(cfg, env)),
        _run_one("gpus", lambda: check_gpus(cfg, env, gpus)),
        _run_one("weights", lambda: check_weights(cfg, env)),
    ]


def expected_gpus(env: Mapping[str, str], given: int | None) -> int:
    if given is not None:
        return given
    text = env.get(Env.GPUS_PER_WORKER.value, "").strip()
    if not text.isdigit():
        return 0 if not text else _bad_gpus(text)
    return int(text)


def _bad_gpus(text: str) -> int:
    raise ConfigError(f"${Env.GPUS_PER_WORKER.value}={text!r} is not a whole number; fix the pod's environment")


def doctor_command(cfg, gpus: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Print one line per check and a summary; the first failure's exit code (0 when none failed)."""
    env = os.environ if env is None else env
    results = run_checks(cfg, env, expected_gpus(env, gpus))
    for result in results:
        print(result.line(), flush=True)
    failed = [r for r in results if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skip", "FAIL")}
    print(f"doctor: {counts['ok']} ok, {counts['skip']} skipped, {counts['FAIL']} failed", file=sys.stderr, flush=True)
    return failed[0].exit_code if failed else int(ExitCode.OK)
