"""The Dockerfile cannot be built here (no Docker engine): these tests keep it in step with
pyproject.toml, constraints.txt, trainer/contract.py, tf-keras and the chart."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import tomllib

import yaml
from chart_helpers import CHART, ROOT, one, render
from packaging.specifiers import SpecifierSet

from trainer import contract

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.*)$", joined, re.M)]


def arg_default(name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in instructions("ARG") if a.startswith(f"{name}=")]
    return value


def pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.lower().replace("_", "-").split("==") for line in lines if "==" in line)


def test_base_image_is_gpu_tensorflow_of_the_pinned_version():
    base = arg_default("BASE_IMAGE")
    match = re.fullmatch(r"tensorflow/tensorflow:(\d+\.\d+\.\d+)-gpu", base)
    tf_requirement = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("tensorflow"))

    assert match, f"base image {base} is not a tensorflow/tensorflow:<version>-gpu tag"
    assert match.group(1) == pins()["tensorflow"], "base image TF != the tensorflow pin in constraints.txt"
    assert match.group(1) in SpecifierSet(tf_requirement.removeprefix("tensorflow"))
    assert pins()["tf-keras"].split(".")[:2] == match.group(1).split(".")[:2]
    assert instructions("FROM") == ["${BASE_IMAGE} AS weights", "${BASE_IMAGE}"]


def test_installs_the_project_as_pyproject_says_with_the_pins():
    runs = " ".join(instructions("RUN"))
    copies = instructions("COPY")
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()

    assert "python3 -m pip install -c constraints.txt ." in runs
    assert "pyproject.toml constraints.txt README.md ./" in copies
    assert "trainer ./trainer" in copies
    assert PYPROJECT["project"]["readme"] == "README.md"  # needed to build the package
    assert f"sys.version_info >= ({minimum[0]}, {minimum[1]})" in runs
    assert "trainer config" in runs  # the installed entrypoint runs at build time


def test_dockerignore_keeps_what_the_build_copies():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]

    assert lines[0] == "*"  # an allow-list: nothing else (venvs, runs, .tools, .git) reaches the context
    for needed in ("pyproject.toml", "constraints.txt", "README.md", "trainer/"):
        assert f"!{needed}" in lines
    assert "**/__pycache__" in lines


def test_runs_as_the_contracts_user_and_the_charts():
    (user,) = instructions("USER")
    run_as = one(render(), "Job")["spec"]["template"]["spec"]["securityContext"]

    assert user == f"{contract.CONTAINER_UID}:{contract.CONTAINER_GID}"
    assert f"useradd --uid {contract.CONTAINER_UID} --gid {contract.CONTAINER_GID}" in DOCKERFILE
    assert f"groupadd --gid {contract.CONTAINER_GID}" in DOCKERFILE
    assert (run_as["runAsUser"], run_as["runAsGroup"]) == (contract.CONTAINER_UID, contract.CONTAINER_GID)


def test_entrypoint_is_the_command_the_chart_runs():
    (entrypoint,) = instructions("ENTRYPOINT")
    (container,) = one(render(), "Job")["spec"]["template"]["spec"]["containers"]

    assert json.loads(entrypoint) == [contract.ENTRYPOINT]
    assert PYPROJECT["project"]["scripts"][contract.ENTRYPOINT] == "trainer.cli:main"
    assert container["command"] == [contract.ENTRYPOINT]


def test_exposes_the_contracts_ports_like_the_chart():
    (expose,) = instructions("EXPOSE")
    (container,) = one(render(), "Job")["spec"]["template"]["spec"]["containers"]

    assert sorted(int(p) for p in expose.split()) == sorted([contract.WORKER_PORT, contract.METRICS_PORT])
    assert sorted(p["containerPort"] for p in container["ports"]) == sorted(int(p) for p in expose.split())


def test_environment_selects_tf_keras():
    env = " ".join(instructions("ENV"))

    assert f"{contract.Env.LEGACY_KERAS.value}=1" in env
    assert "HOME=/home/trainer" in env


def test_bakes_the_keras_vgg16_notop_weights_with_keras_hash():
    spec = importlib.util.find_spec("tf_keras")  # read tf-keras's source without importing TensorFlow
    source = (pathlib.Path(spec.origin).parent / "src" / "applications" / "vgg16.py").read_text()
    url = "".join(re.search(r"WEIGHTS_PATH_NO_TOP = \((.*?)\)", source, re.S).group(1).split('"')[1::2])
    md5 = re.search(r"_notop\.h5\",\s*WEIGHTS_PATH_NO_TOP,.*?file_hash=\"([0-9a-f]+)\"", source, re.S).group(1)

    assert arg_default("VGG16_NOTOP_URL") == url
    assert url.endswith("/" + contract.VGG16_NOTOP_WEIGHTS_FILE)
    assert arg_default("VGG16_NOTOP_MD5") == md5
    assert "VGG16_NOTOP_SHA256" in DOCKERFILE and "hashlib.sha256" in DOCKERFILE
    assert 'sys.exit(f"error: {url} failed verification' in DOCKERFILE


def test_baked_weights_are_where_the_chart_points():
    (copy,) = [c for c in instructions("COPY") if c.startswith("--from=weights")]
    source, target = copy.split()[1:]
    chart_default = yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["model"]["weights"]

    assert target.rstrip("/") + "/" + pathlib.PurePosixPath(source).name == contract.BAKED_WEIGHTS_PATH
    assert chart_default == contract.BAKED_WEIGHTS_PATH
    assert f"ln -s {contract.BAKED_WEIGHTS_PATH} /home/trainer/.keras/models/" in DOCKERFILE


def test_oci_labels_match_the_project():
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', DOCKERFILE))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())

    assert labels["org.opencontainers.image.title"] == contract.IMAGE_NAME
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"] == chart["appVersion"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]["text"]
    assert labels["org.opencontainers.image.description"]
    assert labels["org.opencontainers.image.base.name"] == "${BASE_IMAGE}"
