"""trainer.contract + trainer.errors: exit codes, and the `trainer` CLI ending with them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from trainer.cli import main
from trainer.contract import NON_RETRIABLE_EXIT_CODES, RETRIABLE_EXIT_CODES, Env, ExitCode
from trainer.errors import ConfigError, DataError, Preempted, TrainerError, TransientError
from trainer.exits import classify


def test_exit_codes_are_distinct_and_documented_values():
    values = [code.value for code in ExitCode]

    assert len(values) == len(set(values))
    assert {code.name: code.value for code in ExitCode} == {
        "OK": 0,
        "INTERNAL": 1,
        "CONFIG_ERROR": 64,
        "DATA_ERROR": 65,
        "TRANSIENT": 75,
        "PREEMPTED": 76,
    }


def test_retriable_and_non_retriable_codes_are_disjoint():
    assert set(NON_RETRIABLE_EXIT_CODES).isdisjoint(RETRIABLE_EXIT_CODES)
    assert set(NON_RETRIABLE_EXIT_CODES) == {ExitCode.CONFIG_ERROR, ExitCode.DATA_ERROR}
    assert ExitCode.OK not in RETRIABLE_EXIT_CODES + NON_RETRIABLE_EXIT_CODES
    # Preemption is neither: the chart treats it as a disruption, not a failure.
    assert ExitCode.PREEMPTED not in RETRIABLE_EXIT_CODES + NON_RETRIABLE_EXIT_CODES


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (TrainerError, ExitCode.INTERNAL),
        (ConfigError, ExitCode.CONFIG_ERROR),
        (DataError, ExitCode.DATA_ERROR),
        (TransientError, ExitCode.TRANSIENT),
        (Preempted, ExitCode.PREEMPTED),
    ],
)
def test_each_error_class_carries_its_exit_code(error, code):
    err = error("something went wrong; do this")

    assert isinstance(err, TrainerError)
    assert err.exit_code == code


def test_legacy_keras_env_name():
    assert Env.LEGACY_KERAS.value == "TF_USE_LEGACY_KERAS"


# --------------------------------------------------------------------------- the CLI end to end


@pytest.fixture
def clean_env(monkeypatch):
    """No cluster and no config file from the environment of whoever runs the tests."""
    monkeypatch.delenv(Env.TF_CONFIG.value, raising=False)
    monkeypatch.delenv(Env.CONFIG_FILE.value, raising=False)


def test_cli_config_prints_effective_yaml_and_exits_0(clean_env, capsys):
    code = main(["config", "--set", "train.batch_size_per_replica=4"])

    out = capsys.readouterr().out
    assert code == ExitCode.OK
    assert yaml.safe_load(out)["train"]["batch_size_per_replica"] == 4


def test_cli_config_typo_exits_64_with_one_error_line(clean_env, capsys):
    code = main(["config", "--set", "trian.x=1"])

    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG_ERROR == 64
    assert err.startswith("error: ")
    assert "trian: unknown key; did you mean 'train'?" in err
    assert err.count("\n") == 1


def test_cli_missing_config_file_exits_64(clean_env, capsys, tmp_path):
    code = main(["config", "--config", str(tmp_path / "missing.yaml")])

    err = capsys.readouterr().err
    assert code == 64
    assert err == f"error: config file {tmp_path / 'missing.yaml'} not found; pass an existing YAML file to --config\n"


def test_cli_train_on_missing_dataset_exits_65_with_one_error_line(clean_env, capsys, tmp_path):
    code = main(["train", "--set", "data.dataset=/nonexistent", "--set", f"output.dir={tmp_path / 'run'}"])

    err = capsys.readouterr().err
    assert code == ExitCode.DATA_ERROR == 65
    assert err.startswith("error: no manifest.json in /nonexistent; run `trainer prepare")
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`trainer ARGS` in a fresh process, without a cluster or config file from the environment."""
    env = {k: v for k, v in os.environ.items() if k not in (Env.TF_CONFIG.value, Env.CONFIG_FILE.value)}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "problem", "hint"),
    [
        ([], "the following arguments are required: command", "trainer --help"),
        (["train", "--bogus", "1"], "unrecognized arguments: --bogus 1", "trainer train --help"),
        (["launch", "--workers", "two"], "argument --workers: invalid int value: 'two'", "trainer launch --help"),
        (["job", "run"], "the following arguments are required: manifests", "trainer job run --help"),
        (["job", "run", "m.yaml", "--network", "wifi"], "argument --network: invalid choice: 'wifi'",
         "trainer job run --help"),
        (["evaluate", "run", "data", "--split", "dev"], "argument --split: invalid choice: 'dev'",
         "trainer evaluate --help"),
    ],
)  # fmt: skip
def test_a_bad_command_line_is_one_line_and_exit_64_with_a_help_hint(args, problem, hint):
    result = _cli(*args)

    assert result.returncode == ExitCode.CONFIG_ERROR
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: {problem}"), result.stderr
    assert result.stderr.endswith(f"; see `{hint}`\n")
    assert result.stdout == ""


def test_help_still_exits_0():
    result = _cli("train", "--help")

    assert result.returncode == 0 and result.stdout.startswith("usage: trainer train")


@pytest.mark.parametrize("command", ["train", "launch"])
def test_a_missing_required_setting_is_a_config_error_saying_how_to_set_it(command, tmp_path):
    only_output = _cli(command, "--set", f"output.dir={tmp_path / 'run'}")
    neither = _cli(command)

    assert only_output.returncode == neither.returncode == ExitCode.CONFIG_ERROR
    assert only_output.stderr.startswith("error: data.dataset is not set; pass --set data.dataset=DATASET ")
    assert only_output.stderr.count("\n") == 1
    assert neither.stderr.startswith("error: data.dataset and output.dir are not set; pass --set data.dataset=")
    assert "--set output.dir=RUN_DIR" in neither.stderr and neither.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_tensorflow_errors_are_summarised_by_their_informative_line():
    from trainer.errors import tf_error_summary

    message = (
        "Graph execution error:\n\nDetected at node IteratorGetNext defined at (most recent call last):\n"
        '  File "train.py", line 6, in <module>\n\n'
        "gs://bucket/data/train-00001-of-00004.tfrecord; No such file or directory\n"
        "\t [[{{node IteratorGetNext}}]] [Op:__inference_train_function_31]"
    )

    assert tf_error_summary(message) == "gs://bucket/data/train-00001-of-00004.tfrecord; No such file or directory"
    assert tf_error_summary("Collective ops is aborted by: peer died") == "Collective ops is aborted by: peer died"
    gcs_404 = (
        "Error executing an HTTP request: HTTP response code 404 with body '{\"error\": {}}'\n"
        "\t when reading gs://bucket/data/train-00001-of-00004.tfrecord"
    )
    assert tf_error_summary(gcs_404) == (
        "Error executing an HTTP request: HTTP response code 404 at gs://bucket/data/train-00001-of-00004.tfrecord"
    )
    decode = (
        "Graph execution error:\n\nDetected at node map/while/DecodeImage defined at (most recent call last):\n"
        "<stack traces unavailable>\nInput is empty.\n\t [[{{node map/while/DecodeImage}}]] [Op:__inference_serve_1]"
    )
    assert tf_error_summary(decode) == "Input is empty."
    no_space = (
        "{{function_node __wrapped__SaveV2_dtypes_2_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
        "/run/backup/ckpt-1_temp; No space left on device [Op:SaveV2]"
    )
    assert tf_error_summary(no_space) == "/run/backup/ckpt-1_temp; No space left on device"


def test_a_sigterm_that_lands_while_tensorflow_raises_is_still_a_stop():
    # pybind11's words when the SIGTERM handler's exception replaces one TensorFlow was raising
    # (seen in a 2-worker run stopped while a peer had just died).
    swapped = RuntimeError(
        "pybind11::error_already_set: MISMATCH of original and normalized active exception types: "
        "ORIGINAL UnavailableError REPLACED BY Preempted: received SIGTERM; stopping"
    )

    assert classify(swapped).exit_code == ExitCode.PREEMPTED
    assert classify(RuntimeError("something else")) is None
