"""The Job runner's process side: pods as local processes, driven by the Job controller's decisions.

A controller thread polls the pods every ``poll_interval`` seconds, tells the controller
(:mod:`trainer.jobrunner.controller`, pure: completions, parallelism, podFailurePolicy,
backoffLimit, podReplacementPolicy, deadlines) what happened, and carries out what it decides.
Each pod is one :class:`trainer.supervisor.Child`, in its own process group and (where the
machine allows) its own network namespaces (:mod:`.network`); :mod:`.podspec` gives its command,
environment and volumes.

- Starting a pod: its hosts file, then its main process; its output is kept (``Pod.log``) and
  printed prefixed ``[<pod name>]``.
- Deleting a pod (an eviction by :meth:`JobRunner.delete_pod`, or the Job ending): SIGTERM to its
  main process, SIGKILL to its process group after ``terminationGracePeriodSeconds``. An eviction
  gives the pod the DisruptionTarget condition the podFailurePolicy can match.
- When the main process exits, the rest of its process group is killed (a container's processes
  end with it) before the exit is judged: a replacement never meets a leftover of the old pod.
- The Job's status (V1JobStatus), conditions (V1JobCondition) and events are the kubernetes
  package's models and the runner's :class:`Event` list.

Not emulated: scheduling, resources, probes and securityContext (the pods run as the runner's
user); the delay before re-creating failed pods is 0 unless ``backoff_delay_seconds`` is given
(Kubernetes uses 10 s doubling).
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import ConfigError
from trainer.jobrunner import podspec
from trainer.jobrunner.controller import COMPLETE, JobController, JobPolicy, LivePod, Outcome, index_ranges
from trainer.jobrunner.manifests import Manifests, load_manifests
from trainer.jobrunner.network import HostNetwork, PodNetwork, hosts_file, make_network
from trainer.supervisor import Child

DISRUPTION_REASON = "EvictionByEvictionAPI"


@dataclass(frozen=True)
class Event:
    """Something the runner did or saw; ``time`` is seconds since the Job started."""

    time: float
    reason: str  # PodStarted, PodSucceeded, PodFailed, PodDeleting, PodSignalled, JobCondition, Warning
    message: str
    pod: str | None = None
    index: int | None = None
    exit_code: int | None = None
    action: str | None = None  # PodFailed: FailJob | Ignore | Count | (none: stopped with the Job)
    replaces: str | None = None  # PodStarted: the pod of the same index this one replaces


@dataclass
class Pod:
    name: str
    index: int
    plan: podspec.PodPlan
    child: Child
    log: list[str] = field(default_factory=list)
    deleting_since: float | None = None
    disruption: bool = False  # DisruptionTarget condition
    by_job: bool = False  # deleted because the Job finished
    finished: float | None = None
    exit_code: int | None = None

    @property
    def proc(self) -> Any:  # subprocess.Popen of the pod's main process
        return self.child.proc

    @property
    def started(self) -> float:
        return self.child.started

    @property
    def live(self) -> bool:
        return self.finished is None

    @property
    def phase(self) -> str:
        if self.finished is None:
            return "Running"
        return "Succeeded" if self.exit_code == 0 else "Failed"


class JobRunner:
    """Run one Indexed Job from rendered manifests on this machine.

    ``executables`` maps a command name (the container's ``command[0]``, e.g. ``trainer``) to the
    argv that replaces it; by default ``trainer`` is the console script next to this Python.
    ``network``: ``auto`` (per-pod namespaces when possible), ``pod``, ``host`` or a network object. ``base_env``:
    the environment pods inherit (default: this process's, minus TF_CONFIG, JOB_COMPLETION_INDEX
    and TRAINER_*); the container's env is applied on top. ``volume_dirs`` maps volume names of
    other types (e.g. a PersistentVolumeClaim) to local directories.
    """

    def __init__(
        self,
        manifests: str | Manifests,
        *,
        namespace: str | None = None,
        job_name: str | None = None,
        executables: Mapping[str, Sequence[str]] | None = None,
        network: str | HostNetwork | PodNetwork = "auto",
        base_env: Mapping[str, str] | None = None,
        volume_dirs: Mapping[str, str] | None = None,
        sink: Any = None,
        announce: bool = True,
        workdir: str | None = None,
        keep_workdir: bool = False,
        backoff_delay_seconds: float = 0.0,
        poll_interval: float = 0.05,
    ):
        self.manifests = manifests if isinstance(manifests, Manifests) else load_manifests(manifests, job_name)
        job = self.manifests.job
        self.name = job.metadata.name
        self.namespace = namespace or job.metadata.namespace or "default"
        if job.spec.suspend:
            raise ConfigError(f"Job {self.name} is suspended (spec.suspend); a suspended Job starts no pods")
        if executables is None:
            from trainer.launch import entrypoint_command

            executables = {"trainer": entrypoint_command()}
        self.executables = {k: list(v) for k, v in executables.items()}
        self.base_env = podspec.inherited_env(base_env)
        self.volume_dirs = dict(volume_dirs or {})
        self.network: HostNetwork | PodNetwork = make_network(network)
        self.sink = sink or sys.stdout
        self.announce = announce
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"jobrunner-{self.name}-")
        self.keep_workdir = keep_workdir
        self.backoff_delay_seconds = backoff_delay_seconds
        self.poll_interval = poll_interval

        self.policy = JobPolicy.from_spec(job.spec, self.manifests.container.name, backoff_delay_seconds)
        self.controller = JobController(self.policy)
        self.completions = self.policy.completions
        self.parallelism = self.policy.parallelism
        self.backoff_limit = self.policy.backoff_limit

        self._lock = threading.RLock()
        self._sink_lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._rng = random.SystemRandom()
        self._seq = 0
        self._t0 = 0.0
        self._start_wall: datetime.datetime | None = None
        self._completion_wall: datetime.datetime | None = None
        self.pods: list[Pod] = []
        self._events: list[Event] = []
        self._conditions: list[Any] = []  # V1JobCondition
        self._service_ok = self._check_service()
        self._check_plan()

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the Job was already started")
        self.network.start()
        self._t0 = time.monotonic()
        self._start_wall = datetime.datetime.now(datetime.UTC)
        mode = getattr(self.network, "mode", "")
        self._say(
            f"Job {self.name}: {self.completions} index(es), parallelism {self.parallelism}, "
            f"backoffLimit {self.backoff_limit}, network {self.network.name}{f' ({mode})' if mode else ''}"
        )
        if not self.network.isolated and self.completions > 1:
            self._event("Warning", "pods share the host network: peer names do not resolve, ports may collide")
        if not self._service_ok:
            self._event("Warning", f"no headless Service named {self.manifests.pod_spec.subdomain!r} selects the pods")
        self._thread = threading.Thread(target=self._loop, name=f"jobrunner-{self.name}", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the Job has a terminal condition; its V1JobStatus. TimeoutError if not."""
        if self._thread is None:
            raise RuntimeError("start() the Job first")
        if not self._done.wait(timeout):
            raise TimeoutError(f"Job {self.name} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.status()

    def run(self, timeout: float | None = None) -> Any:
        """start(), wait(); past ``timeout`` the Job is stopped (Failed, reason RunnerTimeout)."""
        self.start()
        try:
            return self.wait(timeout)
        except TimeoutError:
            self.stop("RunnerTimeout", f"the runner's timeout of {timeout} s passed")
            return self.wait()

    def stop(self, reason: str = "Stopped", message: str = "stopped by the runner") -> None:
        """Fail the Job now (like deleting it): its pods get SIGTERM, then SIGKILL after the grace."""
        with self._lock:
            self._fail(reason, message)

    def close(self, grace_seconds: float | None = None) -> None:
        """Stop the Job if it still runs, wait for its pods, remove the network and work files."""
        if self._thread is not None:
            if not self._done.is_set():
                with self._lock:
                    self._fail("Stopped", "the runner was closed")
                    if grace_seconds is not None:
                        for pod in self.pods:
                            if pod.live:
                                pod.child.terminate(grace_seconds)
            self._done.wait()
            self._thread.join(timeout=10)
        self.network.close()
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- actions -------------------------------------------------------------------------------

    def delete_pod(self, index: int, grace_seconds: float | None = None) -> str:
        """Evict the live pod of ``index``: DisruptionTarget, SIGTERM, SIGKILL after the grace."""
        with self._lock:
            pod = self._live_pod(index)
            self._delete(pod, grace_seconds, disruption=True)
            return pod.name

    def kill_pod(self, index: int, sig: int = signal.SIGKILL) -> str:
        """Send ``sig`` to the main process of the live pod of ``index`` (a crash, not a disruption)."""
        with self._lock:
            pod = self._live_pod(index)
            self._event("PodSignalled", f"sent {signal.Signals(sig).name}", pod)
            pod.child.send(sig)
            return pod.name

    def pod_log(self, index: int, attempt: int = -1) -> str:
        """Output of a pod of ``index`` (the newest by default; 0 = the first one)."""
        with self._lock:
            pods = [p for p in self.pods if p.index == index]
            if not pods:
                raise KeyError(f"no pod of index {index} was started")
            return "".join(pods[attempt].log)

    def pods_of(self, index: int) -> list[Pod]:
        with self._lock:
            return [p for p in self.pods if p.index == index]

    def live_pod(self, index: int) -> Pod | None:
        with self._lock:
            return next((p for p in self.pods if p.index == index and p.live), None)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def succeeded(self) -> bool:
        return any(c.type == "Complete" for c in self.conditions)

    @property
    def conditions(self) -> list[Any]:
        with self._lock:
            return list(self._conditions)

    @property
    def exit_code(self) -> int:
        """0 when Complete; else the exit code of the pod that failed the Job, the last failure's, or 1."""
        return 0 if self.succeeded else self.controller.failure_code

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        """Poll ``predicate`` until truthy (returned); TimeoutError naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached within {timeout} s")
            time.sleep(0.05)

    def wait_for_log(self, index: int, text: str, timeout: float) -> Pod:
        """The live pod of ``index`` once its output contains ``text``."""

        def check():
            pod = self.live_pod(index)
            return pod if pod is not None and text in "".join(pod.log) else None

        return self.wait_for(check, timeout, f"{text!r} in the log of index {index}")

    @property
    def ignored(self) -> int:
        """Failed pods the podFailurePolicy ignored (preempted, disrupted): not counted toward backoffLimit."""
        return self.controller.ignored

    def status(self) -> Any:
        """The Job's status as the kubernetes package's V1JobStatus."""
        from kubernetes.client import V1JobStatus

        with self._lock:
            live = [p for p in self.pods if p.live]
            active = [p for p in live if p.deleting_since is None]
            complete = any(c.type == "Complete" for c in self._conditions)
            return V1JobStatus(
                active=len(active),
                ready=len(active),
                terminating=len(live) - len(active),
                succeeded=len(self.controller.succeeded),
                failed=self.controller.failed,
                completed_indexes=index_ranges(self.controller.succeeded),
                conditions=list(self._conditions) or None,
                start_time=self._start_wall,
                completion_time=self._completion_wall if complete else None,
            )

    # --- the controller loop: the controller decides, the runner does it ----------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._tick():
                        break
                time.sleep(self.poll_interval)
        except BaseException as err:  # surface in wait(); stop what we started
            self._error = err
            with self._lock:
                for pod in self.pods:
                    if pod.live:
                        pod.child.kill()
        finally:
            self._done.set()

    def _tick(self) -> bool:
        now = time.monotonic()
        for pod in self.pods:
            if pod.live and pod.child.poll() is not None:
                self._terminated(pod)
            elif pod.live:
                pod.child.enforce_grace(now)
        outcome = self.controller.check(now - self._t0)
        if outcome is not None:
            self._finishing(outcome)
        for index in self.controller.indexes_to_start(now, self._live_pods()):
            self._create_pod(index)
        finished = self.controller.outcome
        if finished is not None and not any(p.live for p in self.pods):
            if finished.kind == COMPLETE:
                self._completion_wall = datetime.datetime.now(datetime.UTC)
            self._condition(finished.kind, finished.reason, finished.message)
            return True
        return False

    def _live_pods(self) -> list[LivePod]:
        return [LivePod(p.index, terminating=p.deleting_since is not None) for p in self.pods if p.live]

    def _create_pod(self, index: int) -> None:
        name = podspec.pod_name(self.name, index, self._rng)
        replaces = next((p.name for p in reversed(self.pods) if p.index == index), None)
        meta = podspec.pod_meta(self.manifests, index, name, self.namespace, self.network.address(index))
        root = os.path.join(self.workdir, name)
        plan = podspec.plan_pod(self.manifests, meta, root, self.executables, self.base_env, self.volume_dirs)
        hosts = os.path.join(root, "etc-hosts")
        with open(hosts, "w") as f:
            f.write(hosts_file(self._host_entries(index, plan.hostname), f"hosts file of pod {name} (jobrunner)"))
        self._seq += 1
        spec = {
            "index": index,
            "argv": plan.argv,
            "cwd": plan.cwd,
            "parent_pid": os.getpid(),
            "hostname": plan.hostname,
            "hosts_file": hosts,
        }
        log: list[str] = []
        child = Child(self.network.command(spec, self._seq), env=plan.env, on_line=self._pod_output(name, log))
        pod = Pod(name=name, index=index, plan=plan, child=child, log=log)
        self.pods.append(pod)
        message = f"created pod {name}" + (f" (replaces {replaces})" if replaces else "")
        self._event("PodStarted", message, pod, replaces=replaces)

    def _pod_output(self, name: str, log: list[str]) -> Callable[[str], None]:
        def keep_and_print(line: str) -> None:
            log.append(line)
            self._write(f"[{name}] {line}")

        return keep_and_print

    def _host_entries(self, own: int, hostname: str) -> list[tuple[str, list[str]]]:
        subdomain = self.manifests.pod_spec.subdomain
        entries = []
        for index in range(self.completions):
            names = []
            if subdomain and self._service_ok:
                names = podspec.peer_names(self.name, index, subdomain, self.namespace)
            if index == own:
                names.append(hostname)
            if self.network.isolated or index == own:
                entries.append((self.network.address(index), names))
        for alias in self.manifests.pod_spec.host_aliases or []:
            entries.append((alias.ip, list(alias.hostnames or [])))
        return entries

    def _check_plan(self) -> None:
        """Fail now, not in the first pod, on what no pod could get (a missing ConfigMap, a bad fieldRef)."""
        check = os.path.join(self.workdir, ".check")
        meta = podspec.pod_meta(self.manifests, 0, f"{self.name}-0-check", self.namespace)
        try:
            podspec.plan_pod(self.manifests, meta, check, self.executables, self.base_env, self.volume_dirs)
        except BaseException:
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(check, ignore_errors=True)

    def _check_service(self) -> bool:
        service = self.manifests.headless_service()
        if service is None:
            return False
        meta = podspec.pod_meta(self.manifests, 0, f"{self.name}-0-check", self.namespace)
        return podspec.selector_matches(service.spec.selector, meta.labels)

    def _terminated(self, pod: Pod) -> None:
        """The pod's main process exited: end its other processes, then let the controller judge the exit."""
        pod.child.end_group()
        pod.child.join_output(timeout=2)
        pod.exit_code = pod.child.exit_code
        pod.finished = time.monotonic()
        verdict = self.controller.pod_exited(
            pod.index,
            pod.exit_code,
            now=pod.finished,
            disruption=pod.disruption,
            by_job=pod.by_job,
            pod=f"{self.namespace}/{pod.name}",
        )
        reason = "PodSucceeded" if pod.exit_code == 0 else "PodFailed"
        self._event(reason, verdict.describe(), pod, exit_code=pod.exit_code, action=verdict.action)
        if verdict.outcome is not None:
            self._finishing(verdict.outcome)

    def _delete(self, pod: Pod, grace_seconds: float | None, disruption: bool = False, by_job: bool = False) -> None:
        if not pod.live:
            return
        grace = pod.plan.grace_seconds if grace_seconds is None else grace_seconds
        pod.disruption = pod.disruption or disruption
        pod.by_job = pod.by_job or by_job
        if pod.deleting_since is None:
            pod.deleting_since = time.monotonic()
            why = DISRUPTION_REASON + " (DisruptionTarget)" if disruption else "the Job is ending"
            self._event("PodDeleting", f"deleting: {why}; SIGTERM, SIGKILL after {grace:g} s", pod)
        pod.child.terminate(grace)

    def _live_pod(self, index: int) -> Pod:
        pod = next((p for p in self.pods if p.index == index and p.live and p.deleting_since is None), None)
        if pod is None:
            raise LookupError(f"index {index} of Job {self.name} has no running pod")
        return pod

    def _fail(self, reason: str, message: str) -> None:
        outcome = self.controller.fail(reason, message)
        if outcome is not None:
            self._finishing(outcome)

    def _finishing(self, outcome: Outcome) -> None:
        """The Job has its outcome: the interim condition now; a failing Job's pods are deleted."""
        self._condition(outcome.interim_condition, outcome.reason, outcome.message)
        if outcome.kind == COMPLETE:
            return
        for pod in self.pods:
            if pod.live:
                self._delete(pod, None, by_job=True)

    # --- output --------------------------------------------------------------------------------

    def _condition(self, kind: str, reason: str, message: str) -> None:
        from kubernetes.client import V1JobCondition

        now = datetime.datetime.now(datetime.UTC)
        self._conditions.append(
            V1JobCondition(
                type=kind,
                status="True",
                reason=reason,
                message=message,
                last_probe_time=now,
                last_transition_time=now,
            )
        )
        self._event("JobCondition", f"{kind} ({reason}): {message}")

    def _event(
        self,
        reason: str,
        message: str,
        pod: Pod | None = None,
        exit_code: int | None = None,
        action: str | None = None,
        replaces: str | None = None,
    ) -> None:
        event = Event(
            time=round(time.monotonic() - self._t0, 3),
            reason=reason,
            message=message,
            pod=pod.name if pod else None,
            index=pod.index if pod else None,
            exit_code=exit_code,
            action=action,
            replaces=replaces,
        )
        self._events.append(event)
        self._say(f"{pod.name}: {message}" if pod else message, reason)

    def _say(self, message: str, reason: str = "") -> None:
        if self.announce:
            self._write(f"[jobrunner] {f'{reason}: ' if reason else ''}{message}\n")

    def _write(self, text: str) -> None:
        with self._sink_lock:
            self.sink.write(text)
            self.sink.flush()


def run_job_file(
    path: str,
    timeout: float | None = None,
    namespace: str | None = None,
    network: str = "auto",
    volumes: Mapping[str, str] | Sequence[str] | None = None,
    keep_workdir: bool = False,
) -> int:
    """`trainer job run`: run the Job of a manifests file ("-" = stdin); its exit code.

    ``volumes``: volume name -> local directory, or ``NAME=DIR`` strings (the --volume option).
    """
    text, source = read_manifests_text(path)
    manifests = load_manifests(text, source=source)
    volume_dirs = volume_map(volumes)
    with JobRunner(
        manifests, namespace=namespace, network=network, volume_dirs=volume_dirs, keep_workdir=keep_workdir
    ) as runner:
        status = runner.run(timeout)
        final = status.conditions[-1]
        print(f"job {runner.name}: {final.type} ({final.reason}): {final.message}", flush=True)
        print(
            f"job {runner.name}: succeeded {status.succeeded}/{runner.completions}, failed {status.failed}, "
            f"ignored {runner.ignored}",
            flush=True,
        )
        if keep_workdir:
            print(f"job {runner.name}: pod files kept in {runner.workdir}", flush=True)
        return runner.exit_code


def volume_map(volumes: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Volume name -> local directory, from a mapping or ``NAME=DIR`` strings (the --volume option)."""
    if isinstance(volumes, Mapping):
        return dict(volumes)
    volume_dirs: dict[str, str] = {}
    for item in volumes or []:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--volume {item!r} is not NAME=DIR")
        volume_dirs[name] = os.path.abspath(directory)
    return volume_dirs


def read_manifests_text(path: str) -> tuple[str, str]:
    """(text, how errors name it) of a manifests file; "-" = standard input."""
    if path == "-":
        return sys.stdin.read(), "standard input"
    try:
        with open(path) as f:
            return f.read(), f"manifests file {path}"
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}; pass the output of `helm template`") from None
