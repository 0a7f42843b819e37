"""Shared test setup: tf-keras before TensorFlow, time bounds, and the lanes of the parallel run."""

import os
import sys
import threading

import pytest

from tests.support import processes

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The GCS emulator harness (fixtures gcs, gcs_clean, gcs_bucket, gcs_env); see tests/support/README.md.
pytest_plugins = ["tests.support.gcs_fixtures"]


# --------------------------------------------------------------------------- lanes (pytest-xdist)
# CI runs the suite in two lanes (scripts/test.sh: --numprocesses=2). Much of a multi-process
# test's time is process start-up and waiting on peers, so two lanes fill the two cores better
# than one. A lane is a unit of work that runs whole in one worker process:
#   - the modules that use the GCS emulator: it owns the sandbox's :443 and :80, one per sandbox;
#   - each test of the modules in PER_TEST_LANES: independent multi-process runs, spread out;
#   - any other module: one lane, so a module-scoped fixture (one training run) runs once.
# The scheduler sees only node ids (tests are collected in the workers), so lanes follow from
# paths; collection checks that every test using the emulator is in a GCS module.
GCS_MODULES = (
    "tests/test_gcs.py",
    "tests/data/prepare/test_prepare_gcs.py",
    "tests/data/test_staging.py",
    "tests/support/test_gcs_harness.py",
    "tests/train/test_run_gcs.py",
    "tests/train/test_run_gcs_faults.py",
    "tests/train/test_lease_gcs.py",
)
PER_TEST_LANES = ("tests/train/test_multi_worker_faults.py", "tests/train/test_devices.py")
#: Started first, longest first, so that the last lane to start is a short one.
LONGEST_FIRST = ("gcs-emulator", "tests/train/test_multi_worker_faults.py", "tests/observability/", "tests/bench/")


def lane(nodeid: str) -> str:
    module = nodeid.split("::")[0]
    if module in GCS_MODULES:
        return "gcs-emulator"
    return nodeid if module in PER_TEST_LANES else module


def _start_order(nodeid: str) -> int:
    name = lane(nodeid)
    return next((i for i, prefix in enumerate(LONGEST_FIRST) if name.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    strays = sorted({i.nodeid.split("::")[0] for i in items if "gcs" in i.fixturenames} - set(GCS_MODULES))
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)} use the GCS emulator: list them in GCS_MODULES (conftest.py)")
    items.sort(key=lambda item: _start_order(item.nodeid))  # the scheduler takes lanes in this order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "load":  # -n without --dist; other modes keep their meaning
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LaneScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    return LaneScheduling(config, log)


# --------------------------------------------------------------------------- time bounds
# Every test has one: pytest-timeout's `timeout` (pyproject.toml, or a test's timeout mark)
# raises in the test through SIGALRM. A test over its bound fails with its name, the last lines
# of each of its processes (the launcher's and job runner's sinks) and kills the processes it
# started. Should the test be stuck where a signal cannot interrupt it (inside a C call), a
# watchdog does the same GRACE_SECONDS later and ends the pytest process, which xdist reports
# as a crash naming the test.
WATCHDOG_GRACE_SECONDS = 60
_STARTED_BEFORE = pytest.StashKey[set]()
_WATCHDOG = pytest.StashKey[threading.Timer]()


def pytest_configure(config: pytest.Config) -> None:
    processes.become_subreaper()  # orphaned workers stay findable (and killable) below pytest


def _bound(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    return float(item.config.getini("timeout") or 0)


def _kill_what_it_started(item: pytest.Item) -> str:
    started = processes.descendants() - item.stash.get(_STARTED_BEFORE, set())
    killed = processes.kill(started)
    return f"killed the {len(killed)} process(es) this test started: {killed}" if killed else "no process was left"


def _watchdog(item: pytest.Item, bound: float) -> None:
    sys.__stderr__.write(
        f"\n{item.nodeid}: still running {WATCHDOG_GRACE_SECONDS} s past its {bound:g} s bound "
        f"(stuck where the timeout signal cannot reach); ending this pytest process\n"
        f"{processes.tails()}\n{_kill_what_it_started(item)}\n"
    )
    sys.__stderr__.flush()
    os._exit(3)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    processes.forget_sinks()
    item.stash[_STARTED_BEFORE] = processes.descendants()
    bound = _bound(item)
    if bound > 0:
        timer = threading.Timer(bound + WATCHDOG_GRACE_SECONDS, _watchdog, args=(item, bound))
        timer.daemon = True
        timer.start()
        item.stash[_WATCHDOG] = timer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if call.when == "teardown" and _WATCHDOG in item.stash:
        item.stash[_WATCHDOG].cancel()
    if call.excinfo is not None and "from pytest-timeout" in str(call.excinfo.value):
        report.sections.append((f"last lines of the processes of {item.nodeid}", processes.tails()))
        report.sections.append(("processes", _kill_what_it_started(item)))
