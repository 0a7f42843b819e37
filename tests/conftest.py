"""Shared test setup: tf-keras (Keras 2) must be selected before TensorFlow is imported."""

import os

import pytest

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
    "tests/data/test_prepare_gcs.py",
    "tests/data/test_staging.py",
    "tests/support/test_gcs_harness.py",
    "tests/train/test_run_gcs.py",
    "tests/train/test_run_gcs_faults.py",
)
PER_TEST_LANES = ("tests/train/test_multi_worker_faults.py",)
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
