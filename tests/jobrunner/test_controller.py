"""trainer.jobrunner.controller against the Kubernetes documentation's Job rules, with no process started.

Each test quotes the rule it checks, from the Job concept page
(https://kubernetes.io/docs/concepts/workloads/controllers/job/) or the batch/v1 API reference
(https://kubernetes.io/docs/reference/kubernetes-api/workload-resources/job-v1/). Time is passed
in, so the delays are checked without waiting. The processes side is tests/jobrunner/test_runner.py.
"""

from __future__ import annotations

import pytest
from kubernetes.client import (
    V1JobSpec,
    V1PodFailurePolicy,
    V1PodFailurePolicyOnExitCodesRequirement,
    V1PodFailurePolicyOnPodConditionsPattern,
    V1PodFailurePolicyRule,
    V1PodTemplateSpec,
)

from trainer.jobrunner.controller import (
    COUNT,
    FAIL_JOB,
    IGNORE,
    JobController,
    JobPolicy,
    LivePod,
    OnExitCodes,
    OnPodCondition,
    Rule,
    backoff_delay,
    index_ranges,
    match_rule,
)

CONTAINER = "trainer"
#: The chart's policy: bad input fails the Job, a preemption (76) or an eviction is not counted.
CHART_RULES = (
    Rule(FAIL_JOB, OnExitCodes("In", frozenset({64, 65}), CONTAINER)),
    Rule(IGNORE, OnExitCodes("In", frozenset({76}), CONTAINER)),
    Rule(IGNORE, on_pod_conditions=(OnPodCondition("DisruptionTarget"),)),
)


def controller(completions: int = 2, **policy) -> JobController:
    return JobController(JobPolicy(completions=completions, container_name=CONTAINER, **policy))


def spec(**fields) -> V1JobSpec:
    return V1JobSpec(template=V1PodTemplateSpec(), completions=fields.pop("completions", 2), **fields)


# --------------------------------------------------------------------------- podFailurePolicy


def test_the_first_matching_rule_decides():
    """The rule: "The rules are evaluated in order. Once a rule matches a Pod failure, the remaining of the rules
    are ignored." (PodFailurePolicy.rules)"""
    rules = (Rule(IGNORE, OnExitCodes("In", frozenset({3}))), Rule(FAIL_JOB, OnExitCodes("In", frozenset({3}))))

    assert match_rule(rules, CONTAINER, 3, disruption=False) == (IGNORE, 0)
    assert match_rule(tuple(reversed(rules)), CONTAINER, 3, disruption=False) == (FAIL_JOB, 0)


def test_a_failure_no_rule_matches_is_counted():
    """The rule: "When no rule matches the Pod failure, the default handling applies - the counter of pod failures
    is incremented and it is checked against the backoffLimit." (PodFailurePolicy.rules)"""
    job = controller(rules=CHART_RULES, backoff_limit=6)

    verdict = job.pod_exited(0, 75, now=0.0)

    assert (verdict.action, verdict.rule) == (COUNT, None)
    assert job.failed == 1 and job.outcome is None


@pytest.mark.parametrize(("operator", "code", "matches"), [("In", 65, True), ("In", 1, False), ("NotIn", 1, True)])
def test_exit_code_operators(operator, code, matches):
    """The rule: "In: the requirement is satisfied if at least one container exit code ... is in the set of specified
    values. NotIn: ... is not in the set of specified values." (PodFailurePolicyOnExitCodesRequirement.operator)"""
    rules = (Rule(FAIL_JOB, OnExitCodes(operator, frozenset({64, 65}))),)

    assert match_rule(rules, CONTAINER, code, disruption=False) == ((FAIL_JOB, 0) if matches else (COUNT, None))


def test_an_exit_code_rule_for_another_container_does_not_match():
    """The rule: "containerName: Restricts the check for exit codes to the container with the specified name. When
    null, the rule applies to all containers." (PodFailurePolicyOnExitCodesRequirement.containerName)"""
    other = (Rule(FAIL_JOB, OnExitCodes("In", frozenset({65}), "sidecar")),)
    any_container = (Rule(FAIL_JOB, OnExitCodes("In", frozenset({65}))),)

    assert match_rule(other, CONTAINER, 65, disruption=False) == (COUNT, None)
    assert match_rule(any_container, CONTAINER, 65, disruption=False) == (FAIL_JOB, 0)


def test_a_succeeded_container_never_matches_an_exit_code_rule():
    """The rule: "Value '0' cannot be used for the In operator" (PodFailurePolicyOnExitCodesRequirement.values): only
    failures are judged, so NotIn does not turn a container that exited 0 into a match either."""
    rules = (Rule(FAIL_JOB, OnExitCodes("NotIn", frozenset({76}))),)

    assert match_rule(rules, CONTAINER, 0, disruption=False) == (COUNT, None)


def test_a_disruption_target_rule_matches_an_evicted_pod_only():
    """The rule: "onPodConditions: ... The requirement is satisfied if at least one pattern matches an actual pod
    condition." and status "Defaults to True." (PodFailurePolicyOnPodConditionsPattern); DisruptionTarget
    "indicates Pod disruption" (eviction, preemption)."""
    rules = (Rule(IGNORE, on_pod_conditions=(OnPodCondition("DisruptionTarget"),)),)
    not_disrupted = (Rule(IGNORE, on_pod_conditions=(OnPodCondition("DisruptionTarget", "False"),)),)

    assert match_rule(rules, CONTAINER, 137, disruption=True) == (IGNORE, 0)
    assert match_rule(rules, CONTAINER, 137, disruption=False) == (COUNT, None)
    assert match_rule(not_disrupted, CONTAINER, 137, disruption=False) == (IGNORE, 0)


def test_fail_job_fails_the_job_at_once_and_starts_nothing_more():
    """The rule: "FailJob: indicates that the pod's job is marked as Failed and all running pods are terminated."
    (PodFailurePolicyRule.action)"""
    job = controller(rules=CHART_RULES)

    verdict = job.pod_exited(1, 65, now=0.0, pod="ml/flowers-1-abcde")

    assert verdict.action == FAIL_JOB and verdict.outcome is not None
    assert (job.outcome.kind, job.outcome.reason, job.outcome.interim_condition) == (
        "Failed",
        "PodFailurePolicy",
        "FailureTarget",
    )
    assert "pod ml/flowers-1-abcde failed with exit code 65 matching FailJob rule at index 0" in job.outcome.message
    assert job.indexes_to_start(0.0, [LivePod(0)]) == []
    assert job.exit_code == 65


def test_ignore_replaces_the_pod_without_counting_it():
    """The rule: "Ignore: indicates that the counter towards the .backoffLimit is not incremented and a replacement
    pod is created." (PodFailurePolicyRule.action)"""
    job = controller(rules=CHART_RULES, backoff_limit=0, parallelism=2)

    for _ in range(3):
        assert job.pod_exited(0, 76, now=0.0).action == IGNORE

    assert (job.failed, job.ignored, job.outcome) == (0, 3, None)
    assert job.indexes_to_start(0.0, [LivePod(1)]) == [0]


def test_pods_stopped_by_the_job_are_counted_but_never_matched():
    """Once the Job fails, "all running pods are terminated" (FailJob); those pods end in phase Failed and
    count in status.failed, but their exit says nothing about the workload, so no rule is applied."""
    job = controller(rules=CHART_RULES)
    job.pod_exited(0, 65, now=0.0)

    verdict = job.pod_exited(1, 143, now=0.0, by_job=True)

    assert verdict.action is None and verdict.describe() == "exit code 143 (stopped with the Job)"
    assert job.failed == 2 and job.exit_code == 65  # the code of the pod that failed the Job


# --------------------------------------------------------------------------- backoffLimit


def test_failures_above_the_backoff_limit_fail_the_job():
    """The rule: "backoffLimit: Specifies the number of retries before marking this job failed." (JobSpec): with 2
    retries the third counted failure fails the Job, reason BackoffLimitExceeded."""
    job = controller(backoff_limit=2)

    assert job.pod_exited(0, 75, now=0.0).outcome is None
    assert job.pod_exited(0, 75, now=1.0).outcome is None
    verdict = job.pod_exited(0, 75, now=2.0)

    assert verdict.outcome is not None and verdict.outcome.reason == "BackoffLimitExceeded"
    assert job.failed == 3 and job.exit_code == 75


def test_backoff_limit_defaults_to_six():
    """The rule: "backoffLimit ... Defaults to 6" (JobSpec)."""
    assert JobPolicy.from_spec(spec(), CONTAINER).backoff_limit == 6
    assert JobPolicy.from_spec(spec(backoff_limit=0), CONTAINER).backoff_limit == 0


def test_failed_pods_are_recreated_after_an_exponential_delay_capped_at_six_minutes():
    """The rule: "Failed Pods associated with the Job are recreated by the Job controller with an exponential
    back-off delay (10s, 20s, 40s ...) capped at six minutes." (Pod backoff failure policy)"""
    assert [backoff_delay(10, n) for n in (1, 2, 3, 6, 7)] == [10, 20, 40, 320, 360]
    assert backoff_delay(0, 5) == 0  # the runner's default: no delay

    job = controller(completions=1, backoff_delay_seconds=10)
    job.pod_exited(0, 75, now=100.0)
    assert job.indexes_to_start(109.9, []) == []
    assert job.indexes_to_start(110.0, []) == [0]


# --------------------------------------------------------------------------- completions, parallelism, replacement


def test_an_indexed_job_completes_when_every_index_has_succeeded():
    """The rule: "Indexed ... The Job is considered complete when there is one successfully completed Pod for each
    index." (JobSpec.completionMode); the Job gets SuccessCriteriaMet first, Complete when its pods are gone."""
    job = controller(completions=3)
    for index in (0, 2):
        job.pod_exited(index, 0, now=0.0)
    assert job.check(active_seconds=1.0) is None
    assert job.indexes_to_start(0.0, []) == [1]

    job.pod_exited(1, 0, now=0.0)
    outcome = job.check(active_seconds=1.0)

    assert (outcome.kind, outcome.reason, outcome.interim_condition) == (
        "Complete",
        "CompletionsReached",
        "SuccessCriteriaMet",
    )
    assert job.exit_code == 0 and job.indexes_to_start(0.0, []) == []


def test_parallelism_caps_the_running_pods():
    """The rule: "parallelism: Specifies the maximum desired number of pods the job should run at any given time."
    (JobSpec); indexes are started lowest first."""
    job = controller(completions=5, parallelism=2)

    assert job.indexes_to_start(0.0, []) == [0, 1]
    assert job.indexes_to_start(0.0, [LivePod(0)]) == [1]
    assert job.indexes_to_start(0.0, [LivePod(0), LivePod(1)]) == []


def test_replacement_policy_failed_waits_until_the_old_pod_is_gone():
    """The rule: "Failed means to wait until a previously created Pod is fully terminated (has phase Failed or
    Succeeded) before creating a replacement Pod." (JobSpec.podReplacementPolicy)"""
    job = controller(completions=1, pod_replacement_policy="Failed")

    assert job.indexes_to_start(0.0, [LivePod(0, terminating=True)]) == []
    assert job.indexes_to_start(0.0, []) == [0]


def test_replacement_policy_terminating_or_failed_replaces_a_terminating_pod_at_once():
    """The rule: "TerminatingOrFailed means that we recreate pods when they are terminating (has a
    metadata.deletionTimestamp) or failed." (JobSpec.podReplacementPolicy)"""
    job = controller(completions=1, pod_replacement_policy="TerminatingOrFailed")

    assert job.indexes_to_start(0.0, [LivePod(0, terminating=True)]) == [0]
    assert job.indexes_to_start(0.0, [LivePod(0)]) == []


def test_replacement_policy_defaults_to_failed_with_a_pod_failure_policy():
    """The rule: "When using podFailurePolicy, Failed is the the only allowed value. TerminatingOrFailed and Failed
    are allowed values when podFailurePolicy is not in use." (JobSpec.podReplacementPolicy); the default
    is TerminatingOrFailed without one."""
    rule = V1PodFailurePolicyRule(
        action="Ignore", on_pod_conditions=[V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget")]
    )
    with_policy = JobPolicy.from_spec(spec(pod_failure_policy=V1PodFailurePolicy(rules=[rule])), CONTAINER)

    assert with_policy.pod_replacement_policy == "Failed"
    assert with_policy.rules == (Rule(IGNORE, on_pod_conditions=(OnPodCondition("DisruptionTarget", "True"),)),)
    assert JobPolicy.from_spec(spec(), CONTAINER).pod_replacement_policy == "TerminatingOrFailed"


def test_exit_code_rules_are_read_from_the_job_spec():
    """The API's onExitCodes (containerName, operator, values) become the rule the controller matches."""
    codes = V1PodFailurePolicyOnExitCodesRequirement(container_name=CONTAINER, operator="In", values=[64, 65])
    failure_policy = V1PodFailurePolicy(rules=[V1PodFailurePolicyRule(action="FailJob", on_exit_codes=codes)])

    policy = JobPolicy.from_spec(spec(pod_failure_policy=failure_policy, parallelism=2), CONTAINER)

    assert policy.rules == (Rule(FAIL_JOB, OnExitCodes("In", frozenset({64, 65}), CONTAINER)),)
    assert (policy.completions, policy.parallelism) == (2, 2)


# --------------------------------------------------------------------------- deadline and status


def test_the_active_deadline_fails_the_job():
    """The rule: "Once a Job reaches activeDeadlineSeconds, all of its running Pods are terminated and the Job status
    will become type: Failed with reason: DeadlineExceeded." (Job termination and cleanup)"""
    job = controller(active_deadline_seconds=30)

    assert job.check(active_seconds=29.9) is None
    outcome = job.check(active_seconds=30.0)

    assert (outcome.kind, outcome.reason) == ("Failed", "DeadlineExceeded")
    assert job.check(active_seconds=31.0) is None  # decided once
    assert job.fail("Stopped", "by hand") is None  # a Job that is already ending keeps its outcome


def test_completed_indexes_use_the_status_format():
    """The rule: "The numbers are listed in increasing order. Three or more consecutive numbers are compressed and
    represented by the first and last element of the series, separated by a hyphen. For example, if the
    completed indexes are 1, 3, 4, 5 and 7, they are represented as "1,3-5,7"." (JobStatus.completedIndexes)"""
    assert index_ranges([7, 1, 4, 3, 5]) == "1,3-5,7"
    assert index_ranges([0, 1]) == "0,1"
    assert index_ranges([0, 1, 2]) == "0-2"
    assert index_ranges([]) is None
