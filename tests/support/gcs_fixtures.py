"""pytest fixtures for the GCS test harness (tests/support/gcs.py).

Register once, in tests/conftest.py::

    pytest_plugins = ["tests.support.gcs_fixtures"]

Fixtures:

* ``gcs`` (session): the running :class:`~tests.support.gcs.GcsEmulator`. FAILS (never skips)
  when the storage host names do not resolve to loopback, i.e. outside scripts/sandbox.sh.
* ``gcs_clean`` (function): the same harness with no fault rules, an empty request log and
  zeroed fix-up counters, before and after the test.
* ``gcs_bucket`` (function): the name of a new, empty bucket (implies ``gcs_clean``).
* ``gcs_env`` (function): ``os.environ`` plus ``gcs.env()``, for subprocesses (trainer, TF).

One harness serves the whole process (it owns 127.0.0.1:443 and :80 of the sandbox), even if
this module is registered or imported more than once.
"""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from tests.support.gcs import SANDBOX_HINT, STORAGE_HOSTS, GcsEmulator, in_sandbox

_shared: dict = {"harness": None, "users": 0}
_shared_lock = threading.Lock()


def require_sandbox() -> None:
    """Fail the current test unless the storage host names resolve to 127.0.0.1."""
    if not in_sandbox():
        pytest.fail(
            f"GCS tests need {' and '.join(STORAGE_HOSTS)} to resolve to 127.0.0.1 in a private network "
            f"namespace: {SANDBOX_HINT}",
            pytrace=False,
        )


def acquire_harness() -> GcsEmulator:
    """The process-wide harness, started on first use (pair with :func:`release_harness`)."""
    with _shared_lock:
        if _shared["harness"] is None:
            _shared["harness"] = GcsEmulator().start()
        _shared["users"] += 1
        return _shared["harness"]


def release_harness() -> None:
    with _shared_lock:
        _shared["users"] -= 1
        if _shared["users"] <= 0 and _shared["harness"] is not None:
            _shared["harness"].stop()
            _shared["harness"] = None
            _shared["users"] = 0


@pytest.fixture(scope="session")
def gcs():
    require_sandbox()
    harness = acquire_harness()
    try:
        yield harness
    finally:
        release_harness()


@pytest.fixture
def gcs_clean(gcs):
    gcs.reset()
    yield gcs
    gcs.reset()


@pytest.fixture
def gcs_bucket(gcs_clean) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    gcs_clean.create_bucket(name)
    return name


@pytest.fixture
def gcs_env(gcs) -> dict[str, str]:
    return {**os.environ, **gcs.env()}
