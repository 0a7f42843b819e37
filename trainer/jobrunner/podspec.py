"""One pod of the Job as a local process plan: metadata, environment, volumes, command.

Pure functions over the typed models (no processes): the runner builds a :class:`PodPlan` per
pod and hands it to the network layer to start.

Volumes cannot be bind-mounted at their mountPath without touching the machine's filesystem,
so each mounted volume becomes a per-pod directory (ConfigMap and Secret keys written as files,
emptyDir an empty directory, other types only when the caller maps the volume name to a local
directory) and every environment value, command word and argument that starts with a
mountPath (``/etc/trainer`` or ``/etc/trainer/...``) gets that prefix replaced by the
directory. Paths inside files (e.g. in the ConfigMap's YAML) are not rewritten.

Exception: volumes mounted at the machine's shared temporary directories (/tmp, /var/tmp,
/dev/shm) are still created per pod but paths under them are left alone, because locally those
directories also hold what pods must reach by absolute path (test directories, virtualenvs,
datasets); a pod's /tmp volume is handed to it as TMPDIR instead.
"""

from __future__ import annotations

import base64
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import ConfigError
from trainer.jobrunner.manifests import Manifests

#: Annotation and labels the Job controller puts on Indexed Job pods.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
CONTROLLER_UID_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid")
#: Kubernetes' own env variable on Indexed Job containers.
INDEX_ENV = "JOB_COMPLETION_INDEX"
#: Names of the runner's environment that never leak into a pod (the pod sets its own).
LEAKY_ENV = re.compile(r"^(TF_CONFIG|JOB_COMPLETION_INDEX|TRAINER_.*)$")
#: Characters of generated pod-name suffixes (Kubernetes' utilrand alphabet).
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
DEFAULT_GRACE_SECONDS = 30


def pod_name(job_name: str, index: int, rng: random.Random | None = None) -> str:
    """``<job>-<index>-<random5>``, like the Job controller's generateName."""
    rng = rng or random.SystemRandom()
    return f"{job_name}-{index}-" + "".join(rng.choice(_SUFFIX_ALPHABET) for _ in range(5))


def pod_hostname(job_name: str, index: int) -> str:
    """The hostname the Job controller gives the pod of an Indexed Job: ``<job>-<index>``."""
    return f"{job_name}-{index}"


def peer_names(job_name: str, index: int, subdomain: str, namespace: str) -> list[str]:
    """DNS names of a pod behind its headless Service, longest first."""
    host = pod_hostname(job_name, index)
    return [
        f"{host}.{subdomain}.{namespace}.svc.cluster.local",
        f"{host}.{subdomain}.{namespace}.svc",
        f"{host}.{subdomain}.{namespace}",
        f"{host}.{subdomain}",
    ]


@dataclass
class PodMeta:
    name: str
    index: int
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    uid: str = ""
    pod_ip: str = ""
    node_name: str = "localhost"


def pod_meta(manifests: Manifests, index: int, name: str, namespace: str, pod_ip: str = "") -> PodMeta:
    job = manifests.job
    template_meta = job.spec.template.metadata
    labels = dict((template_meta.labels if template_meta else None) or {})
    annotations = dict((template_meta.annotations if template_meta else None) or {})
    uid = job.metadata.uid or f"local-{job.metadata.name}"
    for key in JOB_NAME_LABELS:
        labels[key] = job.metadata.name
    for key in CONTROLLER_UID_LABELS:
        labels[key] = uid
    labels[INDEX_LABEL] = str(index)
    annotations[INDEX_ANNOTATION] = str(index)
    return PodMeta(name, index, namespace, labels, annotations, uid=f"{uid}-{name}", pod_ip=pod_ip)


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- environment ---------------------------------------------------------------------------


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined references replaced, ``$$`` -> ``$``."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            if text[i + 1] == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(variables[name] if name in variables else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


def field_value(path: str, meta: PodMeta, pod_spec: Any) -> str:
    """A downward-API ``fieldRef.fieldPath`` of the pod."""
    simple = {
        "metadata.name": meta.name,
        "metadata.namespace": meta.namespace,
        "metadata.uid": meta.uid,
        "spec.nodeName": meta.node_name,
        "spec.serviceAccountName": pod_spec.service_account_name or "default",
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
        "status.podIP": meta.pod_ip,
        "status.podIPs": meta.pod_ip,
    }
    if path in simple:
        return simple[path]
    match = _FIELD_KEY.match(path)
    if match:
        source = meta.labels if match.group(1) == "labels" else meta.annotations
        return source.get(match.group(2), "")
    raise ConfigError(f"env fieldRef {path!r} is not supported by the local Job runner")


def _data_value(obj: Any, key: str, kind: str) -> str | None:
    if obj is None:
        return None
    if kind == "Secret":
        if obj.string_data and key in obj.string_data:
            return obj.string_data[key]
        raw = (obj.data or {}).get(key)
        return base64.b64decode(raw).decode() if raw is not None else None
    value = (obj.data or {}).get(key)
    if value is None and obj.binary_data and key in obj.binary_data:
        value = base64.b64decode(obj.binary_data[key]).decode()
    return value


def _ref_value(ref: Any, manifests: Manifests, kind: str) -> str | None:
    source = manifests.config_maps if kind == "ConfigMap" else manifests.secrets
    value = _data_value(source.get(ref.name), ref.key, kind)
    if value is None and not ref.optional:
        raise ConfigError(f"env needs key {ref.key!r} of {kind} {ref.name!r}, which is not in the manifests")
    return value


def container_env(manifests: Manifests, meta: PodMeta) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (envFrom, then env, then the index)."""
    container, pod_spec = manifests.container, manifests.pod_spec
    env: dict[str, str] = {}
    for source in container.env_from or []:
        prefix = source.prefix or ""
        for ref, kind, objs in (
            (source.config_map_ref, "ConfigMap", manifests.config_maps),
            (source.secret_ref, "Secret", manifests.secrets),
        ):
            if ref is None:
                continue
            obj = objs.get(ref.name)
            if obj is None:
                if ref.optional:
                    continue
                raise ConfigError(f"envFrom names {kind} {ref.name!r}, which is not in the manifests")
            keys = set(obj.data or {}) | set(getattr(obj, "binary_data", None) or {})
            keys |= set(getattr(obj, "string_data", None) or {})
            for key in sorted(keys):
                env[prefix + key] = _data_value(obj, key, kind) or ""
    for var in container.env or []:
        if var.value_from is None:
            env[var.name] = expand(var.value or "", env)
            continue
        source = var.value_from
        if source.field_ref is not None:
            env[var.name] = field_value(source.field_ref.field_path, meta, pod_spec)
        elif source.config_map_key_ref is not None:
            value = _ref_value(source.config_map_key_ref, manifests, "ConfigMap")
            if value is not None:
                env[var.name] = value
        elif source.secret_key_ref is not None:
            value = _ref_value(source.secret_key_ref, manifests, "Secret")
            if value is not None:
                env[var.name] = value
        else:
            raise ConfigError(f"env {var.name}: valueFrom other than fieldRef/configMapKeyRef/secretKeyRef")
    env.setdefault(INDEX_ENV, str(meta.index))  # the Job controller adds it to Indexed Job pods
    return env


def inherited_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The runner's environment minus what a pod must only get from its own spec."""
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if not LEAKY_ENV.match(k)}


# --- volumes ---------------------------------------------------------------------------------


def _write_file(path: str, content: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, mode)


def _key_bytes(obj: Any, key: str, kind: str) -> bytes | None:
    if kind == "Secret":
        if obj.string_data and key in obj.string_data:
            return obj.string_data[key].encode()
        raw = (obj.data or {}).get(key)
        return base64.b64decode(raw) if raw is not None else None
    if obj.data and key in obj.data:
        return obj.data[key].encode()
    if obj.binary_data and key in obj.binary_data:
        return base64.b64decode(obj.binary_data[key])
    return None


def volume_file(target: str, relative: str, what: str) -> str:
    """``relative`` under the volume directory ``target``; a path that would leave it is refused.

    The API server refuses such item paths too; the runner writes files on this machine, so a
    hand-made manifest must not make it write outside the pod's directory.
    """
    parts = relative.split("/")
    if not relative or relative.startswith("/") or ".." in parts:
        raise ConfigError(
            f"{what}: path {relative!r} is absolute or contains '..'; give a relative path inside the volume"
        )
    return os.path.join(target, relative)


def _materialise_keys(obj: Any, kind: str, source: Any, target: str) -> None:
    mode = source.default_mode if source.default_mode is not None else 0o644
    name = f"{kind} {obj.metadata.name!r}"
    if source.items:
        for item in source.items:
            path = volume_file(target, item.path, f"volume item {item.key!r} of {name}")
            content = _key_bytes(obj, item.key, kind)
            if content is None:
                raise ConfigError(f"volume item {item.key!r} is not a key of {name}")
            _write_file(path, content, item.mode if item.mode is not None else mode)
        return
    keys = set(obj.data or {}) | set(getattr(obj, "binary_data", None) or {})
    keys |= set(getattr(obj, "string_data", None) or {})
    for key in sorted(keys):
        _write_file(volume_file(target, key, f"key of {name}"), _key_bytes(obj, key, kind) or b"", mode)


def materialise_volumes(
    manifests: Manifests, root: str, volume_dirs: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """Create the pod's volumes under ``root``; (mountPath, local path) for each mount, longest first."""
    volume_dirs = dict(volume_dirs or {})
    volumes = {v.name: v for v in manifests.pod_spec.volumes or []}
    local: dict[str, str] = {}
    mounts: list[tuple[str, str]] = []
    for mount in manifests.container.volume_mounts or []:
        if mount.name not in local:
            local[mount.name] = _volume_dir(mount.name, volumes.get(mount.name), manifests, root, volume_dirs)
        path = local[mount.name]
        if mount.sub_path:
            path = os.path.join(path, mount.sub_path)
            os.makedirs(path, exist_ok=True)
        mounts.append((mount.mount_path.rstrip("/") or "/", path))
    return sorted(mounts, key=lambda m: len(m[0]), reverse=True)


def _volume_dir(name: str, volume: Any, manifests: Manifests, root: str, volume_dirs: dict[str, str]) -> str:
    if name in volume_dirs:
        return volume_dirs[name]
    if volume is None:
        raise ConfigError(f"volumeMount {name!r} names no volume of the pod")
    target = os.path.join(root, name)
    os.makedirs(target, exist_ok=True)
    if volume.empty_dir is not None:
        return target
    for source, kind, objs, ref_name in (
        (volume.config_map, "ConfigMap", manifests.config_maps, volume.config_map and volume.config_map.name),
        (volume.secret, "Secret", manifests.secrets, volume.secret and volume.secret.secret_name),
    ):
        if source is None:
            continue
        obj = objs.get(ref_name)
        if obj is None:
            if source.optional:
                return target
            raise ConfigError(
                f"volume {name!r} needs {kind} {ref_name!r}, which is not in the manifests"
                + ("; map it to a local directory (volume_dirs / --volume NAME=DIR)" if kind == "Secret" else "")
            )
        _materialise_keys(obj, kind, source, target)
        return target
    shutil.rmtree(target, ignore_errors=True)
    raise ConfigError(
        f"volume {name!r} is neither a ConfigMap, a Secret nor an emptyDir; "
        "map it to a local directory (volume_dirs / --volume NAME=DIR)"
    )


#: Mount paths whose prefix is never rewritten (see the module docstring).
SHARED_HOST_DIRS = ("/", "/tmp", "/var/tmp", "/dev/shm")


def rewrite_path(value: str, mounts: Sequence[tuple[str, str]]) -> str:
    """Replace a leading mountPath by its local directory (mounts longest first)."""
    for mount_path, local in mounts:
        if mount_path in SHARED_HOST_DIRS:
            continue
        if value == mount_path:
            return local
        if value.startswith(mount_path + "/"):
            return local + value[len(mount_path) :]
    return value


# --- command ---------------------------------------------------------------------------------


def resolve_command(
    container: Any, env: Mapping[str, str], executables: Mapping[str, Sequence[str]], mounts: Sequence[tuple[str, str]]
) -> list[str]:
    """command + args with ``$(VAR)`` expanded, mount paths rewritten, the entrypoint mapped."""
    if not container.command:
        raise ConfigError(
            f"container {container.name!r} has no command; the image's entrypoint is unknown to the local runner"
        )
    words = [rewrite_path(expand(w, env), mounts) for w in [*container.command, *(container.args or [])]]
    head = words[0]
    mapped = executables.get(head)
    if mapped is None and "/" in head:
        mapped = executables.get(os.path.basename(head))
    return [*mapped, *words[1:]] if mapped is not None else words


@dataclass
class PodPlan:
    meta: PodMeta
    hostname: str
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    mounts: list[tuple[str, str]] = field(default_factory=list)
    grace_seconds: float = DEFAULT_GRACE_SECONDS


def plan_pod(
    manifests: Manifests,
    meta: PodMeta,
    root: str,
    executables: Mapping[str, Sequence[str]],
    base_env: Mapping[str, str],
    volume_dirs: Mapping[str, str] | None = None,
) -> PodPlan:
    """Everything needed to start the pod: volumes created under ``root``."""
    container, pod_spec = manifests.container, manifests.pod_spec
    mounts = materialise_volumes(manifests, os.path.join(root, "volumes"), volume_dirs)
    own = container_env(manifests, meta)
    argv = resolve_command(container, own, executables, mounts)
    env = dict(base_env)
    env.update({k: rewrite_path(v, mounts) for k, v in own.items()})
    hostname = pod_spec.hostname or pod_hostname(manifests.job_name, meta.index)
    env["HOSTNAME"] = hostname
    env.setdefault("PYTHONUNBUFFERED", "1")
    tmp = dict(mounts).get("/tmp")
    if tmp and "TMPDIR" not in own:
        env["TMPDIR"] = tmp  # the pod's /tmp is its own emptyDir
    cwd = rewrite_path(container.working_dir, mounts) if container.working_dir else None
    grace = pod_spec.termination_grace_period_seconds
    return PodPlan(
        meta=meta,
        hostname=hostname,
        argv=argv,
        env=env,
        cwd=cwd,
        mounts=mounts,
        grace_seconds=float(DEFAULT_GRACE_SECONDS if grace is None else grace),
    )
