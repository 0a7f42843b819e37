"""The Job controller's rules for an Indexed Job, as pure functions of what happened: no processes, no I/O.

What the rules say (batch/v1, Kubernetes 1.31+; https://kubernetes.io/docs/concepts/workloads/controllers/job/)
and where each is decided here:

- **Completions** (:meth:`JobController.check`): an Indexed Job is complete when every index
  0..completions-1 has a succeeded pod; the Job then gets SuccessCriteriaMet, and Complete once
  its pods are gone (CompletionsReached). ``status.completedIndexes`` is :func:`index_ranges`.
- **Parallelism and replacement** (:meth:`JobController.indexes_to_start`): at most
  ``parallelism`` pods run; an index without a succeeded or live pod gets one. With
  ``podReplacementPolicy: Failed`` (the only value allowed with a podFailurePolicy, and its
  default then) a replacement waits until the old pod has fully terminated;
  ``TerminatingOrFailed`` (the default otherwise) replaces a pod as soon as it is terminating.
- **podFailurePolicy** (:func:`match_rule`): a failed pod is matched against the rules in order,
  the first match decides; ``FailJob`` fails the Job (reason PodFailurePolicy), ``Ignore`` does
  not count the failure and replaces the pod, ``Count`` (also when no rule matches) counts it.
  ``onExitCodes`` looks at the named container's exit code (0 never matches);
  ``onPodConditions`` at the pod's conditions (here only DisruptionTarget: an eviction).
- **backoffLimit** (:meth:`JobController.pod_exited`): counted failures above ``backoffLimit``
  (default 6) fail the Job (reason BackoffLimitExceeded); before that, a failed pod is re-created
  after an exponential delay (:func:`backoff_delay`: Kubernetes' 10 s doubling, capped at 6 min;
  the runner's base is configurable, 0 by default).
- **activeDeadlineSeconds** (:meth:`JobController.check`): a Job active longer fails with reason
  DeadlineExceeded.
- **Termination**: a failing Job gets FailureTarget at once, its running pods are terminated, and
  Failed once they are gone. Pods the Job itself stops count in ``status.failed`` but are never
  matched against the policy.

Not emulated: backoffLimitPerIndex, maxFailedIndexes, successPolicy and NonIndexed Jobs (the
chart uses none of them; trainer.jobrunner.manifests refuses what it cannot run).
The runner (trainer.jobrunner.runner) starts and stops the processes these decisions ask for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

FAIL_JOB, IGNORE, COUNT = "FailJob", "Ignore", "Count"
COMPLETE, FAILED = "Complete", "Failed"
DISRUPTION_TARGET = "DisruptionTarget"
#: ``spec.backoffLimit`` when the Job does not set it.
DEFAULT_BACKOFF_LIMIT = 6
#: Kubernetes caps the delay before re-creating a failed pod at six minutes.
MAX_BACKOFF_DELAY_SECONDS = 360.0


# --------------------------------------------------------------------------- the policy, from the Job's spec


@dataclass(frozen=True)
class OnExitCodes:
    """``onExitCodes``: the container's exit code ``In`` / ``NotIn`` ``values`` (container None: any)."""

    operator: str
    values: frozenset[int]
    container_name: str | None = None


@dataclass(frozen=True)
class OnPodCondition:
    """One ``onPodConditions`` pattern: a condition type and its status ("True" unless given)."""

    type: str
    status: str = "True"


@dataclass(frozen=True)
class Rule:
    """One podFailurePolicy rule: an action and either exit codes or pod conditions."""

    action: str
    on_exit_codes: OnExitCodes | None = None
    on_pod_conditions: tuple[OnPodCondition, ...] = ()


@dataclass(frozen=True)
class JobPolicy:
    """The parts of a Job's spec that decide what its controller does."""

    completions: int
    parallelism: int = 1
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    active_deadline_seconds: float | None = None
    rules: tuple[Rule, ...] = ()
    pod_replacement_policy: str = "TerminatingOrFailed"
    container_name: str = ""
    backoff_delay_seconds: float = 0.0  # the first re-creation delay (Kubernetes: 10 s); the runner's is 0

    @classmethod
    def from_spec(cls, spec: Any, container_name: str, backoff_delay_seconds: float = 0.0) -> JobPolicy:
        """From a V1JobSpec (the kubernetes package's model), with the Kubernetes defaults."""
        failure_policy = spec.pod_failure_policy
        # With a podFailurePolicy only Failed is allowed (and the default); otherwise TerminatingOrFailed is.
        replacement = spec.pod_replacement_policy or ("Failed" if failure_policy else "TerminatingOrFailed")
        return cls(
            completions=int(spec.completions),
            parallelism=int(spec.parallelism if spec.parallelism is not None else 1),
            backoff_limit=int(spec.backoff_limit if spec.backoff_limit is not None else DEFAULT_BACKOFF_LIMIT),
            active_deadline_seconds=spec.active_deadline_seconds,
            rules=tuple(_rule(r) for r in failure_policy.rules) if failure_policy else (),
            pod_replacement_policy=replacement,
            container_name=container_name,
            backoff_delay_seconds=backoff_delay_seconds,
        )


def _rule(model: Any) -> Rule:
    codes = model.on_exit_codes
    return Rule(
        action=model.action,
        on_exit_codes=OnExitCodes(codes.operator, frozenset(codes.values or []), codes.container_name)
        if codes is not None
        else None,
        on_pod_conditions=tuple(OnPodCondition(p.type, p.status or "True") for p in model.on_pod_conditions or []),
    )


# --------------------------------------------------------------------------- single decisions


def match_rule(rules: Sequence[Rule], container: str, exit_code: int, disruption: bool) -> tuple[str, int | None]:
    """(action, index of the rule) for a failed pod; (Count, None) when no rule matches."""
    for index, rule in enumerate(rules):
        if rule.on_exit_codes is not None:
            if _exit_code_matches(rule.on_exit_codes, container, exit_code):
                return rule.action, index
        elif any(_condition_matches(pattern, disruption) for pattern in rule.on_pod_conditions):
            return rule.action, index
    return COUNT, None


def _exit_code_matches(requirement: OnExitCodes, container: str, exit_code: int) -> bool:
    if requirement.container_name and requirement.container_name != container:
        return False
    if exit_code == 0:
        return False  # a container that succeeded is never matched
    inside = exit_code in requirement.values
    return inside if requirement.operator == "In" else not inside


def _condition_matches(pattern: OnPodCondition, disruption: bool) -> bool:
    # The only pod condition the runner gives a pod is DisruptionTarget (set when it is evicted).
    return pattern.type == DISRUPTION_TARGET and disruption == (pattern.status == "True")


def backoff_delay(base_seconds: float, failures: int) -> float:
    """Seconds before a failed pod is re-created after ``failures`` counted failures: doubling, capped."""
    if base_seconds <= 0:
        return 0.0
    return min(base_seconds * 2 ** (failures - 1), MAX_BACKOFF_DELAY_SECONDS)


def may_replace(policy: str, live_pods_of_index: Sequence[LivePod]) -> bool:
    """Whether an index may get a new pod now, given its pods still alive."""
    if policy == "Failed":
        return not live_pods_of_index  # wait until the old pod is gone
    return all(pod.terminating for pod in live_pods_of_index)  # a terminating pod does not count


def index_ranges(indexes: Iterable[int]) -> str | None:
    """Kubernetes' completedIndexes format: "1,3-5,7" (runs of three or more as first-last; None: none)."""
    items = sorted(set(indexes))
    out, i = [], 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        run = [str(n) for n in items[i : j + 1]]
        out.append(f"{run[0]}-{run[-1]}" if len(run) >= 3 else ",".join(run))
        i = j + 1
    return ",".join(out) or None


# --------------------------------------------------------------------------- the Job's state


@dataclass(frozen=True)
class LivePod:
    """What the controller needs of a pod whose processes still run."""

    index: int
    terminating: bool = False  # its deletion has started (SIGTERM sent)


@dataclass(frozen=True)
class Outcome:
    """Where the Job is heading: Complete or Failed, with the reason and message of its condition."""

    kind: str
    reason: str
    message: str

    @property
    def interim_condition(self) -> str:
        """The condition added at once; ``kind`` follows when the Job's pods are gone."""
        return "SuccessCriteriaMet" if self.kind == COMPLETE else "FailureTarget"


@dataclass(frozen=True)
class Verdict:
    """What a pod's exit meant: the podFailurePolicy action (None: a success, or stopped with the Job)."""

    exit_code: int
    action: str | None = None
    rule: int | None = None
    outcome: Outcome | None = None  # set when this exit started the Job's end

    def describe(self) -> str:
        if self.exit_code == 0:
            return "exited 0"
        if self.action is None:
            return f"exit code {self.exit_code} (stopped with the Job)"
        rule = f"podFailurePolicy rule {self.rule}" if self.rule is not None else "no podFailurePolicy rule matched"
        return f"exit code {self.exit_code}: {self.action} ({rule})"


@dataclass
class JobController:
    """The state of one Job and every decision on it; the caller reports exits and asks what to start.

    Time is what the caller passes (seconds, monotonic), so every decision can be replayed in a test.
    """

    policy: JobPolicy
    succeeded: set[int] = field(default_factory=set)
    failed: int = 0  # status.failed: counted failures, and pods stopped with the Job
    ignored: int = 0  # failures the podFailurePolicy ignored: never counted toward backoffLimit
    outcome: Outcome | None = None
    failure_exit_code: int | None = None  # of the pod whose failure failed the Job
    last_failed_code: int | None = None
    not_before: dict[int, float] = field(default_factory=dict)  # index -> when it may get a new pod

    def pod_exited(
        self, index: int, exit_code: int, *, now: float, disruption: bool = False, by_job: bool = False, pod: str = ""
    ) -> Verdict:
        """Judge the exit of a pod of ``index`` (``pod``: namespace/name, for the Job's condition message)."""
        self.not_before.pop(index, None)
        if exit_code == 0:
            if self.outcome is None or not by_job:
                self.succeeded.add(index)
            return Verdict(0)
        self.last_failed_code = exit_code
        if by_job or self.outcome is not None:
            self.failed += 1  # stopped with the Job: counted in status, never matched against the policy
            return Verdict(exit_code)
        action, rule = match_rule(self.policy.rules, self.policy.container_name, exit_code, disruption)
        if action == IGNORE:
            self.ignored += 1
            return Verdict(exit_code, action, rule)
        self.failed += 1
        if action == FAIL_JOB:
            message = (
                f"Container {self.policy.container_name} for pod {pod} failed with exit code {exit_code} "
                f"matching FailJob rule at index {rule}"
            )
            return Verdict(exit_code, action, rule, self._fail_by(exit_code, "PodFailurePolicy", message))
        if self.failed > self.policy.backoff_limit:
            message = "Job has reached the specified backoff limit"
            return Verdict(exit_code, action, rule, self._fail_by(exit_code, "BackoffLimitExceeded", message))
        delay = backoff_delay(self.policy.backoff_delay_seconds, self.failed)
        if delay > 0:
            self.not_before[index] = now + delay
        return Verdict(exit_code, action, rule)

    def fail(self, reason: str, message: str) -> Outcome | None:
        """Head for Failed (a deadline, the runner stopping the Job); None if the Job already ends."""
        if self.outcome is not None:
            return None
        self.outcome = Outcome(FAILED, reason, message)
        return self.outcome

    def check(self, active_seconds: float) -> Outcome | None:
        """A new outcome from the deadline or the completions; None if none (or one was set before)."""
        if self.outcome is not None:
            return None
        deadline = self.policy.active_deadline_seconds
        if deadline is not None and active_seconds >= deadline:
            return self.fail("DeadlineExceeded", "Job was active longer than specified deadline")
        if len(self.succeeded) == self.policy.completions:
            self.outcome = Outcome(COMPLETE, "CompletionsReached", "Reached expected number of succeeded pods")
            return self.outcome
        return None

    def indexes_to_start(self, now: float, live: Sequence[LivePod]) -> list[int]:
        """The indexes that get a new pod now, lowest first, within ``parallelism``."""
        if self.outcome is not None:
            return []
        running = sum(1 for pod in live if not pod.terminating)
        starting: list[int] = []
        for index in range(self.policy.completions):
            if running + len(starting) >= self.policy.parallelism:
                break
            if index in self.succeeded or now < self.not_before.get(index, 0.0):
                continue
            if may_replace(self.policy.pod_replacement_policy, [p for p in live if p.index == index]):
                starting.append(index)
        return starting

    @property
    def exit_code(self) -> int:
        """0 when Complete; else :attr:`failure_code`."""
        return 0 if self.outcome is not None and self.outcome.kind == COMPLETE else self.failure_code

    @property
    def failure_code(self) -> int:
        """The code of the pod whose failure failed the Job, else the last failure's, else 1."""
        code = self.failure_exit_code if self.failure_exit_code is not None else self.last_failed_code
        return code if code else 1

    def _fail_by(self, exit_code: int, reason: str, message: str) -> Outcome | None:
        self.failure_exit_code = exit_code
        return self.fail(reason, message)
