"""Google Cloud Storage through google-cloud-storage: objects, retries, clear errors.

Used for whole-object work (manifests, summaries, probes, shard uploads and staging).
TensorFlow's own ``gs://`` filesystem still streams shards into tf.data and writes
checkpoints, TensorBoard logs and SavedModels.

Credentials come from Application Default Credentials: Workload Identity on GKE, a key
file named by ``GOOGLE_APPLICATION_CREDENTIALS``, or ``gcloud auth application-default
login``. ``STORAGE_EMULATOR_HOST`` points the client at an emulator (tests). Credentials
are never logged or put in messages; only the identity's e-mail or kind is.

Retries: transient failures (HTTP 408, 429, 5xx, connection errors, timeouts) are retried
with exponential backoff until the retry budget runs out, then reported as TRANSIENT
(exit 75). Permission (401/403) and not-found (404) errors are not retried: they fail at
once with a message naming the identity and the role it needs.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from trainer import private_apis
from trainer.errors import ConfigError, DataError, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEME = "gs://"
#: Seconds a storage operation may spend retrying transient failures (overridable per call).
DEFAULT_RETRY_BUDGET_SECONDS = 120.0
_budget = {"seconds": DEFAULT_RETRY_BUDGET_SECONDS}

READ_ROLE = "roles/storage.objectViewer"
WRITE_ROLE = "roles/storage.objectUser"


@dataclass(frozen=True)
class GcsPath:
    bucket: str
    name: str  # object name or prefix, without a leading slash

    @classmethod
    def parse(cls, uri: str) -> GcsPath:
        if not uri.startswith(SCHEME) or not uri[len(SCHEME) :].split("/", 1)[0]:
            raise ConfigError(f"{uri!r} is not a gs://bucket/path URI; write it as gs://BUCKET/PREFIX")
        bucket, _, name = uri[len(SCHEME) :].partition("/")
        return cls(bucket, name.lstrip("/"))  # kept as is: "dir/" marker objects end with a slash

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.name}"


def set_retry_budget(seconds: float) -> None:
    """The process-wide retry budget (config: storage.retry_budget_seconds)."""
    _budget["seconds"] = float(seconds)


# --------------------------------------------------------------------------- client and identity


@functools.cache
def client():
    """One client per process (it is thread-safe and pools connections)."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except DefaultCredentialsError:
        raise ConfigError(
            "no Google Cloud credentials found; use Workload Identity, set GOOGLE_APPLICATION_CREDENTIALS "
            "to a key file, or run `gcloud auth application-default login`"
        ) from None


def identity() -> str:
    """Who the storage calls run as, for error messages: an e-mail or a kind, never a secret."""
    credentials = private_apis.storage_credentials(client())
    email = getattr(credentials, "service_account_email", None)
    if email and email != "default":
        return f"service account {email}"
    kind = type(credentials).__name__
    return {
        "AnonymousCredentials": "anonymous (emulator)",
        "Credentials": "application default credentials",
    }.get(kind, f"{kind} credentials")


# --------------------------------------------------------------------------- retries and errors


def _retry():
    """google-cloud-storage's own notion of transient (429, 5xx, connection resets, timeouts,

    including the download layer's InvalidResponse), with our budget, backoff and logging.
    """
    from google.api_core import retry

    is_transient = private_apis.storage_transient_predicate()  # the library's predicate; no public accessor

    def on_error(err: BaseException) -> None:
        log.warning("storage: transient %s, retrying", type(err).__name__)

    return retry.Retry(
        predicate=is_transient, initial=0.5, maximum=10.0, multiplier=2.0, timeout=_budget["seconds"], on_error=on_error
    )


def call(action: str, uri: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one storage call with retries; turn failures into the trainer's errors."""
    try:
        return fn(*args, retry=_retry(), **kwargs)
    except Exception as err:
        raise classify(err, action, uri) from None


def classify(err: BaseException, action: str, uri: str) -> Exception:
    from google.api_core import exceptions

    if isinstance(err, exceptions.Forbidden | exceptions.Unauthorized):
        role = WRITE_ROLE if action in ("write", "delete", "upload") else READ_ROLE
        return ConfigError(
            f"permission denied to {action} {uri} as {identity()}; grant it {role} on the bucket "
            "(or fix the Workload Identity / key file in use)"
        )
    if isinstance(err, exceptions.NotFound) and action in _BUCKET_ACTIONS:
        return missing_bucket(uri)
    if isinstance(err, exceptions.NotFound):
        return DataError(f"{uri} not found while trying to {action} it; check the bucket and path")
    if isinstance(err, FileNotFoundError):
        return err
    import requests

    unreachable = (
        exceptions.GoogleAPICallError,
        exceptions.RetryError,
        requests.RequestException,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(err, unreachable):
        return TransientError(
            f"storage unreachable: could not {action} {uri} within the {_budget['seconds']:.0f} s retry budget "
            f"({type(err).__name__}); the run is retried"
        )
    return err


#: Calls that answer 404 only when the bucket itself is missing (a listing or an upload never lacks an object).
_BUCKET_ACTIONS = ("list", "write", "upload")


def missing_bucket(uri: str) -> ConfigError:
    bucket = GcsPath.parse(uri).bucket
    return ConfigError(
        f"bucket {bucket} does not exist ({uri}); check the bucket name in output.dir / data.dataset "
        "(or the command's gs:// arguments), or create the bucket"
    )


def bucket_exists(bucket: str) -> bool:
    """Whether ``bucket`` exists, by listing one object (objectViewer may list; buckets.get needs more)."""
    from google.api_core import exceptions

    try:
        list(client().list_blobs(bucket, max_results=1, retry=_retry()))
    except exceptions.NotFound:
        return False
    except Exception:  # denied or unreachable: not a missing bucket; the caller's own error stands
        return True
    return True


# --------------------------------------------------------------------------- objects


def _blob(path: GcsPath):
    return client().bucket(path.bucket).blob(path.name)


def read_bytes(uri: str) -> bytes:
    path = GcsPath.parse(uri)
    from google.api_core import exceptions

    try:
        return _blob(path).download_as_bytes(retry=_retry())
    except exceptions.NotFound:
        if not bucket_exists(path.bucket):  # a typo in the bucket name is not "run `trainer prepare` first"
            raise missing_bucket(uri) from None
        raise FileNotFoundError(uri) from None
    except Exception as err:
        raise classify(err, "read", uri) from None


def write_bytes(uri: str, data: bytes, if_absent: bool = False) -> None:
    """One object upload (atomic on GCS). ``if_absent`` makes it create-only."""
    path = GcsPath.parse(uri)
    kwargs = {"if_generation_match": 0} if if_absent else {}
    call("write", uri, _blob(path).upload_from_string, data, **kwargs)


def exists(uri: str) -> bool:
    path = GcsPath.parse(uri)
    if call("read", uri, _blob(path).exists):
        return True
    # A "directory": any object under the prefix.
    return any(True for _ in list_names(uri.rstrip("/") + "/", max_results=1))


def size(uri: str) -> int:
    return int(stat(uri)["size"])


def stat(uri: str) -> dict[str, Any]:
    """size and crc32c (base64, as GCS reports it) of one object."""
    path = GcsPath.parse(uri)
    blob = call("read", uri, client().bucket(path.bucket).get_blob, path.name)
    if blob is None:
        raise FileNotFoundError(uri)
    return {"size": blob.size, "crc32c": blob.crc32c}


def list_names(prefix_uri: str, max_results: int | None = None) -> Iterator[str]:
    """Full gs:// URIs of the objects under a prefix."""
    path = GcsPath.parse(prefix_uri)
    blobs = call("list", prefix_uri, client().list_blobs, path.bucket, prefix=path.name, max_results=max_results)
    try:  # the listing is lazy: its pages are requested, and fail, while iterating
        for blob in blobs:
            yield f"{SCHEME}{path.bucket}/{blob.name}"
    except Exception as err:
        raise classify(err, "list", prefix_uri) from None


def delete(uri: str) -> None:
    from google.api_core import exceptions

    path = GcsPath.parse(uri)
    try:
        _blob(path).delete(retry=_retry())
    except exceptions.NotFound:
        pass
    except Exception as err:
        raise classify(err, "delete", uri) from None


def delete_prefix(prefix_uri: str) -> None:
    for uri in list(list_names(prefix_uri.rstrip("/") + "/")):
        delete(uri)
    delete(prefix_uri)


def crc32c_of_file(local_path: str) -> str:
    """The base64 big-endian CRC32C GCS reports for an object with these bytes."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(local_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            checksum.update(chunk)
    return base64.b64encode(checksum.digest()).decode()


def is_intact_copy(local_path: str, uri: str) -> bool:
    """True when ``uri`` already holds exactly the bytes of ``local_path`` (size + crc32c)."""
    try:
        remote = stat(uri)
    except FileNotFoundError:
        return False
    return remote["size"] == os.path.getsize(local_path) and remote["crc32c"] == crc32c_of_file(local_path)


def upload_file(local_path: str, uri: str) -> bool:
    """Upload unless an intact copy is already there; True when bytes were sent."""
    if is_intact_copy(local_path, uri):
        return False
    path = GcsPath.parse(uri)
    call("upload", uri, _blob(path).upload_from_filename, local_path, checksum="crc32c")
    return True


def download_file(uri: str, local_path: str, expected_size: int | None = None) -> None:
    """Download to ``local_path`` (via a temporary name), verifying crc32c and size."""
    path = GcsPath.parse(uri)
    tmp = f"{local_path}.partial"
    call("read", uri, _blob(path).download_to_filename, tmp, checksum="crc32c")
    got = os.path.getsize(tmp)
    if expected_size is not None and got != expected_size:
        os.remove(tmp)
        raise DataError(
            f"{uri} has {got} bytes, the manifest says {expected_size}; the dataset changed, re-run `trainer prepare`"
        )
    os.replace(tmp, local_path)


# --------------------------------------------------------------------------- conditional writes (leases)


def read_with_generation(uri: str) -> tuple[bytes, int] | None:
    """(bytes, generation) of an object, or None when absent; the bytes are of that generation."""
    from google.api_core import exceptions

    path = GcsPath.parse(uri)
    while True:
        blob = call("read", uri, client().bucket(path.bucket).get_blob, path.name)
        if blob is None:
            return None
        generation = int(blob.generation)  # before the download, which may reset it from response headers
        try:
            data = blob.download_as_bytes(if_generation_match=generation, retry=_retry())
        except exceptions.PreconditionFailed:
            continue  # rewritten between the two calls: read the new generation
        except exceptions.NotFound:
            return None
        except Exception as err:
            raise classify(err, "read", uri) from None
        return data, generation


def write_if_generation(uri: str, data: bytes, generation: int) -> int | None:
    """Write only if the object is at ``generation`` (0: absent); its new generation, or None if it was not."""
    from google.api_core import exceptions

    blob = _blob(GcsPath.parse(uri))
    try:
        # Conditional, so retrying is safe (the library retries such calls only when a precondition is set).
        blob.upload_from_string(data, if_generation_match=generation, retry=_retry())
    except exceptions.PreconditionFailed:
        return None
    except Exception as err:
        raise classify(err, "write", uri) from None
    return int(blob.generation)


def delete_if_generation(uri: str, generation: int) -> None:
    """Delete the object only if it is still at ``generation``."""
    from google.api_core import exceptions

    try:
        _blob(GcsPath.parse(uri)).delete(if_generation_match=generation, retry=_retry())
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        pass
    except Exception as err:
        raise classify(err, "delete", uri) from None


def list_sizes(prefix_uri: str) -> dict[str, int]:
    """{gs:// URI: size} of every object under a prefix, in one listing (the iteration is what calls)."""
    path = GcsPath.parse(prefix_uri)
    try:
        blobs = client().list_blobs(path.bucket, prefix=path.name, retry=_retry())
        return {f"{SCHEME}{path.bucket}/{blob.name}": int(blob.size) for blob in blobs}
    except Exception as err:
        raise classify(err, "list", prefix_uri) from None
