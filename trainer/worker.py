"""What a worker pod does, top to bottom: ``run(cfg)`` is `trainer train`.

1. serve the Prometheus metrics (before TensorFlow, so a worker stuck at start-up is visible);
2. read the cluster from TF_CONFIG (or the Indexed Job's environment);
3. preflight (trainer.train.run.preflight): the manifest and its shards, the weights file, the
   output's lease (trainer.train.lease) and the run's state; bad input fails here, in seconds;
4. a complete run does nothing; otherwise: deterministic ops if asked, wait until every peer
   answers (trainer.rendezvous), build the strategy (trainer.strategy; the first TF op);
5. train (trainer.train.run.train: both phases, evaluation, export, summary, final barrier),
   naming a damaged shard should TensorFlow find one;
6. the chief waits for its peers to leave, then releases the lease, and pushes the run's
   outcome to the Pushgateway (exit code, steps, evaluation) if one is configured.

SIGTERM is turned into ``trainer.errors.Preempted`` by the handler ``trainer.cli.main`` installs
(trainer.signals, which describes the whole stop chain); the phases' stop check
(trainer.train.callbacks.StopRequest) makes every worker stop at the same step with one backup.
Every exception leaves through here unchanged; ``trainer.exits`` maps it to the exit code, the
same one pushed as the outcome.
"""

from __future__ import annotations

import logging
import os
import time

from trainer import signals
from trainer.contract import Env, ExitCode
from trainer.exits import exit_code_of

log = logging.getLogger("trainer")


def run(cfg) -> None:
    """One worker of a run, from start to exit (raises what ends it: main() maps it to the exit code)."""
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
                _push_outcome(cfg, started, exit_code_of(err), {})
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
    signals.reclaim()  # TensorFlow's coordination service took SIGTERM over (trainer.signals.reclaim)
    from trainer.data.pipeline import naming_damaged_shards
    from trainer.group_watch import watching_the_group

    with watching_the_group(cluster), naming_damaged_shards(cfg.data.dataset, checked.manifest):
        summary = train(cfg, dist, checked)
    if cluster.is_multi_worker and cluster.is_chief:
        from trainer.rendezvous import wait_for_peers_to_leave

        # A peer still up one heartbeat timeout after the barrier is hung; the chief stops waiting.
        bound = cfg.runtime.heartbeat_timeout_seconds
        waited = wait_for_peers_to_leave(cluster.workers, cluster.worker_index, bound)
        log.info("all peers left %.1f s after the final barrier; the chief exits last", waited)
    return summary
