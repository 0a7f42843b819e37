"""trainer.cluster: who this process is, from TF_CONFIG."""

from __future__ import annotations

import json
import re

import pytest

from trainer.cluster import make_tf_config, parse_tf_config, tf_config_from_env
from trainer.errors import ConfigError

WORKERS = ["w0:2222", "w1:2222", "w2:2222"]


def tf_config(cluster: dict, task_type: str = "worker", index: int = 0) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("text", [None, "", "   \n"])
def test_absent_or_empty_tf_config_is_a_single_process_chief(text):
    spec = parse_tf_config(text)

    assert spec.workers == ()
    assert spec.num_workers == 1
    assert not spec.is_multi_worker
    assert spec.worker_index == 0
    assert spec.is_chief


@pytest.mark.parametrize("index", [0, 1, 2])
def test_worker_list_worker_zero_is_chief(index):
    spec = parse_tf_config(tf_config({"worker": WORKERS}, "worker", index))

    assert spec.workers == tuple(WORKERS)
    assert spec.num_workers == 3
    assert spec.is_multi_worker
    assert spec.worker_index == index
    assert spec.is_chief == (index == 0)
    assert not spec.has_chief


def test_one_worker_cluster_is_not_multi_worker():
    spec = parse_tf_config(tf_config({"worker": ["only:2222"]}))

    assert spec.num_workers == 1
    assert not spec.is_multi_worker
    assert spec.is_chief


def test_explicit_chief_task_comes_first_and_shifts_worker_indices():
    cluster = {"chief": ["c:2222"], "worker": ["w0:2222", "w1:2222"]}

    chief = parse_tf_config(tf_config(cluster, "chief", 0))
    worker0 = parse_tf_config(tf_config(cluster, "worker", 0))
    worker1 = parse_tf_config(tf_config(cluster, "worker", 1))

    assert chief.workers == ("c:2222", "w0:2222", "w1:2222")
    assert chief.num_workers == 3
    assert chief.has_chief
    assert (chief.worker_index, chief.is_chief) == (0, True)
    assert (worker0.worker_index, worker0.is_chief) == (1, False)
    assert (worker1.worker_index, worker1.is_chief) == (2, False)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"cluster": {}, "task": {"index": "first"}}'])
def test_malformed_tf_config_is_a_one_line_config_error(text):
    with pytest.raises(ConfigError, match=r"^TF_CONFIG is not valid cluster JSON \(.*\); unset it or fix its value$"):
        parse_tf_config(text)


@pytest.mark.parametrize(("task_type", "index", "bound"), [("worker", 3, 3), ("worker", -1, 3), ("chief", 1, 1)])
def test_task_index_outside_its_list_is_a_config_error(task_type, index, bound):
    cluster = {"chief": ["c:2222"], "worker": WORKERS}

    with pytest.raises(ConfigError) as info:
        parse_tf_config(tf_config(cluster, task_type, index))

    assert str(info.value) == f"TF_CONFIG task index {index} is outside the {task_type} list of {bound}; fix TF_CONFIG"


def test_worker_task_in_a_chief_only_cluster_is_a_config_error():
    with pytest.raises(ConfigError, match="outside the worker list of 0"):
        parse_tf_config(tf_config({"chief": ["c:2222"]}, "worker", 0))


@pytest.mark.parametrize("task_type", ["ps", "evaluator"])
def test_unsupported_task_type_is_a_config_error(task_type):
    with pytest.raises(ConfigError, match=f"task type '{task_type}' is not supported"):
        parse_tf_config(tf_config({"worker": WORKERS}, task_type, 0))


def test_worker_given_as_a_string_instead_of_a_list_is_a_config_error():
    # A single address string must not be split into one "worker" per character.
    with pytest.raises(ConfigError):
        parse_tf_config(tf_config({"worker": "w0:2222"}))


def test_make_tf_config_round_trips():
    for index in range(len(WORKERS)):
        text = make_tf_config(WORKERS, index)
        spec = parse_tf_config(text)

        assert json.loads(text)["task"] == {"type": "worker", "index": index}
        assert spec.workers == tuple(WORKERS)
        assert spec.worker_index == index
        assert spec.task_type == "worker"


# --------------------------------------------------------------------------- Indexed Job


def indexed_job_env(index: int, workers: int = 3, **extra: str) -> dict[str, str]:
    """What the Helm chart and Kubernetes set on an Indexed Job's pod."""
    return {
        "TRAINER_NUM_WORKERS": str(workers),
        "TRAINER_JOB_NAME": "flowers-7f9c",
        "TRAINER_SERVICE_NAME": "flowers",
        "TRAINER_NAMESPACE": "ml",
        "TRAINER_WORKER_PORT": "2222",
        "JOB_COMPLETION_INDEX": str(index),
        **extra,
    }


def test_tf_config_is_derived_from_the_indexed_job_environment():
    spec = parse_tf_config(tf_config_from_env(indexed_job_env(2)))

    assert spec.workers == (
        "flowers-7f9c-0.flowers.ml.svc:2222",
        "flowers-7f9c-1.flowers.ml.svc:2222",
        "flowers-7f9c-2.flowers.ml.svc:2222",
    )
    assert spec.worker_index == 2 and not spec.is_chief


def test_an_explicit_tf_config_wins_and_one_worker_needs_none():
    explicit = make_tf_config(["a:1", "b:2"], 1)
    assert tf_config_from_env(indexed_job_env(0, TF_CONFIG=explicit)) == explicit
    assert tf_config_from_env(indexed_job_env(0, workers=1)) is None
    assert tf_config_from_env({}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"TRAINER_NUM_WORKERS": "2"},
            "TRAINER_JOB_NAME, TRAINER_SERVICE_NAME, TRAINER_NAMESPACE, JOB_COMPLETION_INDEX",
        ),
        (indexed_job_env(3), "JOB_COMPLETION_INDEX=3 is outside 0..2"),
        (indexed_job_env(0, TRAINER_NUM_WORKERS="two"), "TRAINER_NUM_WORKERS='two' is not a whole number"),
    ],
)
def test_an_incomplete_job_environment_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tf_config_from_env(env)
