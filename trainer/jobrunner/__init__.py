"""Run the chart's Indexed Job on this machine, with the Job controller's behaviour.

``trainer job run MANIFESTS.yaml`` (or :class:`JobRunner`) takes `helm template` output, reads
it into the ``kubernetes`` package's typed models (:mod:`.manifests`), finds the Job, its
ConfigMaps/Secrets and its headless Service, and runs one OS process per pod (:mod:`.podspec`:
command, args, env with fieldRefs, volumes). :mod:`.controller` holds the Job controller's rules as
pure decisions (completions, parallelism, podFailurePolicy, backoffLimit, podReplacementPolicy,
activeDeadlineSeconds, conditions), unit-tested against the Kubernetes documentation;
:mod:`.runner` carries them out: pods as processes (trainer.supervisor), grace periods, status.

Peer hostnames (:mod:`.network`). The trainer's peers are ``<job>-<i>.<service>.<ns>.svc:2222``,
the same port for every pod. Checked here: TensorFlow's gRPC server binds ``0.0.0.0:<port>``
whatever address its task has, so a second MultiWorkerMirroredStrategy worker on
127.0.0.11:2222 beside one on 127.0.0.10:2222 fails with "Could not start gRPC server":
distinct loopback addresses in one network namespace cannot work, and the trainer has no
per-peer ports. So, where it can (root, or unprivileged user namespaces), the runner gives
every pod its own network, mount and UTS namespaces: a veth ``eth0`` with a stable address
per index (198.18.0.10+i, in RFC 2544's test range, existing only in namespaces the runner
creates) on a bridge in a private hub namespace, its Kubernetes hostname, and a private
/etc/hosts (bind-mounted) mapping every pod's ``<job>-<i>.<service>[.<ns>[.svc[.cluster.local]]]``
to its address. Every pod then listens on 2222 of its own network, like on Kubernetes; the
machine's own network namespace is never changed. Without namespaces the runner falls back to
the host network (one-pod Jobs, commands without peers) and says so.

Volumes are per-pod directories and paths are rewritten (see :mod:`.podspec`).
"""

from trainer.jobrunner.manifests import Manifests, load_manifests, to_model
from trainer.jobrunner.runner import Event, JobRunner, Pod, run_job_file

__all__ = ["Event", "JobRunner", "Manifests", "Pod", "load_manifests", "run_job_file", "to_model"]
