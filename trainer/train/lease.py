"""Who owns a run's output: one lease record, so two runs never train into one ``output.dir``.

Two runs on one output mix silently (a phase recording both runs' epochs, labels from one and
weights from the other). On Kubernetes that is what a ``helm upgrade`` does for a while: the
new Job's pods start while the old Job's are still in their termination grace period. So the
chief of a run holds a lease, ``owner.json`` in the output, while it runs:

- **acquire** (preflight, before TensorFlow starts): create-only, so of two runs starting at once
  exactly one wins. On gs:// an upload with ``ifGenerationMatch=0``; on local disk the read,
  decision and write happen under an exclusive ``flock``. A holder that is another run and still
  alive makes every worker wait up to ``output.lease_wait_seconds`` (the chart sets it to cover
  the old pods' grace period), then fail with exit 75 naming the holder; a retry takes it once
  the holder is gone.
- **take over**: the same owner after a restart (the same Job, or the same ``trainer launch``)
  takes its own lease; a lease not renewed for its ``expires_after_seconds`` is stale and taken;
  so is a local holder whose process is gone. On gs:// the take-over is conditional on the
  generation that was read (``ifGenerationMatch=<generation>``): two takers cannot both win.
- **renew**: a thread rewrites the record every quarter of the expiry, conditional on its own
  last write; a lease found taken over is *lost*, and the chief stops before it writes again.
- **release**: when the chief's process ends (success, error or SIGTERM), conditionally.

Other workers only check that no other live run holds the output. Time comes from each
process's clock: hosts whose clocks differ by more than the expiry can take a live lease.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from trainer import storage
from trainer.contract import LEASE_FILE, Env
from trainer.errors import TransientError

log = logging.getLogger(__name__)

#: How often a waiting worker looks at the lease again.
POLL_SECONDS = 2.0


class LeaseHeld(TransientError):
    """Another live run holds the output (exit 75: a retry takes the lease once that run is gone)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. ``owner`` is what a restart keeps: the same owner takes its own lease."""

    owner: str  # "job NAMESPACE/NAME", "trainer launch pid N on HOST" or "trainer train pid N on HOST"
    host: str
    pid: int  # the owner's process on ``host`` (the launcher for `trainer launch`)

    @property
    def is_job(self) -> bool:
        return self.owner.startswith("job ")


def this_holder(environ: dict[str, str] | None = None) -> Holder:
    """The holder this process is: its Kubernetes Job, its local launcher, or itself."""
    env = os.environ if environ is None else environ
    host = socket.gethostname()
    if env.get(Env.JOB_NAME.value):
        return Holder(f"job {env.get(Env.NAMESPACE.value) or 'default'}/{env[Env.JOB_NAME.value]}", host, os.getpid())
    if env.get(Env.RUN_OWNER.value):
        return Holder(env[Env.RUN_OWNER.value], host, os.getppid())  # the launcher started this worker
    return Holder(f"trainer train pid {os.getpid()} on {host}", host, os.getpid())


@dataclass(frozen=True)
class Record:
    """The lease as stored: the holder, a token naming this acquisition, and when it was renewed."""

    owner: str
    host: str
    pid: int
    token: str
    since: str  # ISO time of the acquisition
    renewed_unix: float
    expires_after_seconds: float

    @classmethod
    def new(cls, holder: Holder, expires_after: float) -> Record:
        now = time.time()
        since = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds")
        return cls(holder.owner, holder.host, holder.pid, uuid.uuid4().hex, since, now, expires_after)

    def renewed(self) -> Record:
        return Record(**{**asdict(self), "renewed_unix": time.time()})

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Record | None:
        """None for an unreadable record (a torn write of an old version): treated as stale."""
        try:
            raw = json.loads(data)
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None

    def age(self) -> float:
        return max(time.time() - self.renewed_unix, 0.0)

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, since {self.since}, renewed {self.age():.0f} s ago)"


def is_stale(record: Record | None) -> bool:
    """Nobody holds a lease that is unreadable, expired, or whose local process is gone."""
    if record is None or record.age() > record.expires_after_seconds:
        return True
    local = record.host == socket.gethostname() and not record.owner.startswith("job ")
    return local and not _process_alive(record.pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def free_for(record: Record | None, me: Holder) -> bool:
    return record is None or record.owner == me.owner or is_stale(record)


# --------------------------------------------------------------------------- where the record lives


class _Store:
    """Compare-and-swap on one small record: ``read`` gives (record, version), writes name the version."""

    def read(self) -> tuple[Record | None, object]: ...
    def swap(self, version: object, record: Record) -> object | None: ...  # new version, None if lost
    def delete(self, version: object) -> None: ...
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield


class _LocalStore(_Store):
    """Local disk (or a shared POSIX mount): flock serialises read-decide-write; writes are atomic renames."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = f"{path}.lock"

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> tuple[Record | None, object]:
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None, None
        record = Record.from_bytes(data)
        return record, (record.token if record else "unreadable")

    def swap(self, version: object, record: Record) -> object | None:
        # Called under exclusive(): the version read then is still the current one.
        storage.write_bytes(self.path, record.to_bytes())
        return record.token

    def delete(self, version: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


class _GcsStore(_Store):
    """gs://: the object's generation is the version; every write and delete is conditional on it."""

    def __init__(self, uri: str):
        self.uri = uri

    def read(self) -> tuple[Record | None, object]:
        from trainer import gcs

        found = gcs.read_with_generation(self.uri)
        if found is None:
            return None, 0  # generation 0: "no such object", the create-only precondition
        data, generation = found
        return Record.from_bytes(data), generation

    def swap(self, version: object, record: Record) -> object | None:
        from trainer import gcs

        return gcs.write_if_generation(self.uri, record.to_bytes(), int(version))

    def delete(self, version: object) -> None:
        from trainer import gcs

        gcs.delete_if_generation(self.uri, int(version))


class _OtherStore(_LocalStore):
    """Other URIs (tf.io.gfile): read-check-write without a lock, best effort (no atomic primitive)."""

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        yield

    def read(self) -> tuple[Record | None, object]:
        if not storage.exists(self.path):
            return None, None
        record = Record.from_bytes(storage.read_bytes(self.path))
        return record, (record.token if record else "unreadable")

    def delete(self, version: object) -> None:
        storage.remove_tree(self.path)


def _store(root: str) -> _Store:
    path = storage.join(root, LEASE_FILE)
    if storage.is_gcs(path):
        return _GcsStore(path)
    return _OtherStore(path) if storage.is_remote(path) else _LocalStore(path)


# --------------------------------------------------------------------------- the lease


def _held_error(root: str, record: Record, waited: float) -> LeaseHeld:
    waited_text = f" (waited {waited:.0f} s)" if waited else ""
    return LeaseHeld(
        f"output.dir {root} is in use by another run: {record.describe()}{waited_text}; wait for it to end or "
        f"stop it, or choose another output.dir (a lease not renewed for {record.expires_after_seconds:.0f} s "
        "expires; a restart of the same Job or launcher takes its own lease)"
    )


def wait_until_free(root: str, me: Holder, wait_seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once no other live run holds ``root``; LeaseHeld after ``wait_seconds``."""
    store, started, said = _store(root), time.monotonic(), False
    while True:
        record, _ = store.read()
        if free_for(record, me):
            return
        waited = time.monotonic() - started
        if waited >= wait_seconds:
            raise _held_error(root, record, waited)
        if not said:
            log.warning(
                "output.dir %s is held by %s; waiting up to %.0f s for it to end", root, record.describe(), wait_seconds
            )
            said = True
        sleep(min(POLL_SECONDS, wait_seconds - waited))


class Lease:
    """The chief's hold on a run's output (see the module docstring)."""

    def __init__(self, root: str, store: _Store, record: Record, version: object):
        self.root, self._store, self.record, self._version = root, store, record, version
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def acquire(cls, root: str, me: Holder, expires_after: float, wait_seconds: float) -> Lease:
        """Take the lease for ``me``: waits for another live holder, then fails with LeaseHeld."""
        store, started = _store(root), time.monotonic()
        while True:
            wait_until_free(root, me, max(wait_seconds - (time.monotonic() - started), 0.0))
            with store.exclusive():
                record, version = store.read()
                if not free_for(record, me):
                    continue  # taken between the wait and the lock: wait again (or fail)
                mine = Record.new(me, expires_after)
                new_version = store.swap(version, mine)
            if new_version is not None:
                if record is not None and record.owner != me.owner:
                    log.warning("took over the lease on %s from %s", root, record.describe())
                log.info("this run holds output.dir %s (%s, expires after %.0f s)", root, LEASE_FILE, expires_after)
                return cls(root, store, mine, new_version)
            # Another taker won the compare-and-swap: loop, and find it holding the lease.

    def start_renewing(self) -> None:
        interval = self.record.expires_after_seconds / 4
        self._thread = threading.Thread(target=self._renew_loop, args=(interval,), name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.renew()
            except Exception as err:  # storage trouble: try again next time; expiry is four intervals away
                log.warning("could not renew the lease on %s: %s", self.root, err)
            if self.lost.is_set():
                return

    def renew(self) -> None:
        with self._store.exclusive():
            current, version = self._store.read()
            if current is None or current.token != self.record.token:
                self._lose(current)
                return
            record = self.record.renewed()
            new_version = self._store.swap(version, record)
        if new_version is None:
            self._lose(None)
            return
        self.record, self._version = record, new_version

    def _lose(self, taker: Record | None) -> None:
        who = taker.describe() if taker else "another run"
        log.error("the lease on output.dir %s was taken over by %s; this run stops writing there", self.root, who)
        self.lost.set()

    def ensure_held(self) -> None:
        """Raise before a write into the output once another run has taken the lease."""
        if self.lost.is_set():
            raise LeaseHeld(
                f"this run lost output.dir {self.root} to another run (its lease was not renewed in time); "
                "it stops so the two do not mix; check for a second run on the same output.dir"
            )

    def release(self) -> None:
        """Give the lease up (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost.is_set():
            return
        try:
            with self._store.exclusive():
                current, version = self._store.read()
                if current is not None and current.token == self.record.token:
                    self._store.delete(version)
        except Exception as err:  # the lease then expires on its own
            log.warning("could not release the lease on %s: %s", self.root, err)
